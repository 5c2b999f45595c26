"""The MLflow edge: tracking client, experiment, registered models, aliases and tags.

MLflow is the source of truth for which versions exist and which one carries the
`serving` / `candidate` alias; MLflow exceptions are translated here and nowhere else.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from embcompat.errors import EmbcompatError, ServiceUnavailable, UnknownVersion
from embcompat.kinds import Alias

PIP_REQUIREMENTS = ["sentence-transformers", "torch"]  # skip MLflow's slow inference


class MlflowRegistry:
    def __init__(self, tracking_uri: str, artifact_root: str, experiment: str) -> None:
        import mlflow
        from mlflow import MlflowClient

        self.mlflow = mlflow
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
        exp = self.client.get_experiment_by_name(experiment)
        self.experiment_id = (
            exp.experiment_id
            if exp
            else self.client.create_experiment(experiment, artifact_location=artifact_root)
        )

    @contextmanager
    def run(self, name: str, tags: dict[str, str] | None = None) -> Iterator[Any]:
        with self.mlflow.start_run(
            experiment_id=self.experiment_id, run_name=name, tags=tags
        ) as active:
            yield active

    def log_sentence_transformer(
        self, model: Any, registered_name: str, tags: dict[str, str]
    ) -> str:
        """Log a SentenceTransformer as an MLflow model and register it; returns the version."""
        with self.run(f"register {registered_name}", tags):
            info = self.mlflow.sentence_transformers.log_model(
                model, name="encoder", pip_requirements=PIP_REQUIREMENTS
            )
        return self.register(info.model_uri, registered_name, tags)

    def log_pyfunc(
        self, run_name: str, python_model: Any, weights: Path, tags: dict[str, str]
    ) -> str:
        """Log a pyfunc of embcompat's own (its class ships with the package) with one
        weights file as its artifact; returns the model URI to register."""
        with self.run(run_name, tags):
            info = self.mlflow.pyfunc.log_model(
                name="encoder",
                python_model=python_model,
                artifacts={"weights": str(weights)},
                pip_requirements=["torch==2.13.0", "numpy"],
            )
        return str(info.model_uri)

    def log_external(
        self, registered_name: str, manifest: dict[str, Any], tags: dict[str, str]
    ) -> str:
        """An `external` version has no weights: its registry entry points at a manifest."""
        with self.run(f"register {registered_name} (external)", tags) as active:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "external.json"
                path.write_text(json.dumps(manifest, indent=2))
                self.mlflow.log_artifact(str(path), artifact_path="encoder")
            source = f"{active.info.artifact_uri}/encoder"
            run_id = active.info.run_id
        return self.create_version(registered_name, source, run_id, tags)

    def log_folder_version(
        self,
        registered_name: str,
        folder: Path,
        tags: dict[str, str],
        metrics: dict[str, float],
        extra_files: tuple[Path, ...] = (),
    ) -> str:
        """Log an artifact folder (an adapter, a binarizer) with its metrics in one run
        and register it as a version of `registered_name`; returns its models:/ URI."""
        with self.run(f"{registered_name} {tags.get('from', '')}", tags) as active:
            self.mlflow.log_metrics(metrics)
            self.mlflow.log_artifacts(str(folder), artifact_path="adapter")
            for extra in extra_files:
                self.mlflow.log_artifact(str(extra), artifact_path="adapter")
            source = f"{active.info.artifact_uri}/adapter"
            run_id = active.info.run_id
        version = self.create_version(registered_name, source, run_id, tags)
        return f"models:/{registered_name}/{version}"

    def create_version(
        self, registered_name: str, source: str, run_id: str, tags: dict[str, str]
    ) -> str:
        """Register artifacts at `source` (logged by run `run_id`) as a new model version."""
        from mlflow.exceptions import MlflowException

        try:
            if not self.versions(registered_name):
                # it may exist without versions, or be created concurrently
                with contextlib.suppress(MlflowException):
                    self.client.create_registered_model(registered_name)
            mv = self.client.create_model_version(registered_name, source, run_id, tags=tags)
        except MlflowException as exc:
            raise ServiceUnavailable(f"MLflow refused to register {source}: {exc}") from exc
        return str(mv.version)

    def register(self, model_uri: str, registered_name: str, tags: dict[str, str]) -> str:
        try:
            mv = self.mlflow.register_model(model_uri, registered_name, tags=tags)
        except self.mlflow.exceptions.MlflowException as exc:
            raise ServiceUnavailable(f"MLflow refused to register {model_uri}: {exc}") from exc
        return str(mv.version)

    def delete_version(self, registered_name: str, version: str) -> None:
        self.client.delete_model_version(registered_name, version)

    def versions(self, registered_name: str) -> list[Any]:
        from mlflow.exceptions import MlflowException

        try:
            return list(self.client.search_model_versions(f"name='{registered_name}'"))
        except MlflowException:
            return []

    def get_version(self, registered_name: str, version: str) -> Any:
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_model_version(registered_name, version)
        except MlflowException as exc:
            raise UnknownVersion(
                f"MLflow has no version {version} of registered model {registered_name!r}"
            ) from exc

    def set_alias(self, registered_name: str, alias: str, version: str) -> None:
        if alias not in set(Alias):
            raise EmbcompatError(f"unknown alias {alias!r}", hint=f"one of {', '.join(Alias)}")
        self.client.set_registered_model_alias(registered_name, alias, version)

    def alias_version(self, registered_name: str, alias: str) -> str | None:
        from mlflow.exceptions import MlflowException

        try:
            return str(self.client.get_model_version_by_alias(registered_name, alias).version)
        except MlflowException:
            return None

    def aliases_of(self, registered_name: str, version: str | None) -> list[str]:
        if version is None:
            return []
        return sorted(self.get_version(registered_name, version).aliases or [])

    def set_tag(self, registered_name: str, version: str, key: str, value: str) -> None:
        self.client.set_model_version_tag(registered_name, version, key, value)
