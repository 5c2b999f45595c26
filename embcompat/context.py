"""The service context that the API, the CLI and the workers share: settings, a DB
transaction and the MLflow registry, each built on first use (never at import)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path

from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from embcompat.db import session_scope
from embcompat.errors import ServiceUnavailable
from embcompat.settings import Settings, get_settings
from embcompat.registry.mlflow_registry import MlflowRegistry


class Context:
    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or get_settings()
        self.data_dir.mkdir(parents=True, exist_ok=True)

    @property
    def data_dir(self) -> Path:
        return self.settings.resolved_data_dir

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @contextmanager
    def session(self) -> Iterator[Session]:
        """One DB transaction; an unreachable database becomes a transient error."""
        try:
            with session_scope(self.settings.resolved_database_url) as session:
                yield session
        except OperationalError as exc:
            raise ServiceUnavailable(f"database unreachable: {exc.orig}") from exc

    @cached_property
    def registry(self) -> MlflowRegistry:
        return MlflowRegistry(
            self.settings.resolved_mlflow_uri,
            self.settings.mlflow_artifact_root,
            self.settings.mlflow_experiment,
        )
