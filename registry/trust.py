"""Where a model may be loaded from, and whether its loading may run code.

An admin token manages models; it must not run code on the host. Two rules hold for
every path that loads a model (API, CLI, workers, demo):

1. A `dir` or `mlflow` location resolves, symlinks included, inside the trusted roots
   (the data directory's models folder and the service's MLflow artifact store by
   default). Anything else is refused with one message, whether or not it exists.
2. A model whose loading runs Python it carries (a pyfunc: pickled classes, `code/`
   folders, `loader_module`s) loads only if embcompat logged it itself, which it
   records as the digest of the model folder, or if the operator opted in.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import yaml

from embcompat.errors import EncoderError, UntrustedModel

REFUSED = "the model location is not inside a trusted model root"
REFUSED_HINT = "place the model under one of the folders of EMBCOMPAT_MODEL_ROOTS"


@dataclass(frozen=True)
class ModelPolicy:
    roots: tuple[Path, ...]
    allow_code: bool = False

    def inside(self, path: Path) -> Path:
        """`path` with every symlink resolved, if that lies inside a root; the refusal
        is the same for a path that exists and one that does not."""
        try:
            real = Path(os.path.realpath(path))
        except (ValueError, OSError):  # a NUL byte, a loop: not a place models live
            raise UntrustedModel(REFUSED, hint=REFUSED_HINT, field="location") from None
        roots = [Path(os.path.realpath(r)) for r in self.roots]
        if not any(real == r or real.is_relative_to(r) for r in roots):
            raise UntrustedModel(REFUSED, hint=REFUSED_HINT, field="location")
        return real


def local_dir(uri: str, tracking_uri: str) -> Path:
    """The local folder behind an MLflow model URI (`models:/`, `runs:/`, `file://` or a
    path), resolved through the service's own registry (MLflow's registry URI, which
    `MlflowRegistry` sets) and tracking store, without downloading anything."""
    scheme = urlparse(uri).scheme
    try:
        if scheme == "models":
            from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository

            uri = ModelsArtifactRepository.get_underlying_uri(uri)
        elif scheme == "runs":
            from mlflow.store.artifact.runs_artifact_repo import RunsArtifactRepository

            uri = RunsArtifactRepository.get_underlying_uri(uri, tracking_uri)
    except Exception as exc:  # MLflow raises many types for an unknown name or run
        raise EncoderError(
            f"no MLflow model at {uri!r}", hint=type(exc).__name__, field="location"
        ) from exc
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):
        return Path(uri)
    raise UntrustedModel(REFUSED, hint=REFUSED_HINT, field="location")


ST_DATA = "model.sentence_transformer"  # where MLflow's flavour keeps the model


def runs_code(folder: Path) -> bool:
    """Whether loading this model may run code it carries. An MLflow model does unless
    it is the sentence-transformers flavour with no `code` folder; a sentence-transformers
    model does if it holds any file but data (`_data_file`: Python, pickled weights, a
    config asking for remote code or unpickling) or names a module outside the library's
    own (`modules.json`)."""
    if (folder / "MLmodel").exists():
        try:
            flavors = yaml.safe_load((folder / "MLmodel").read_text()).get("flavors", {})
        except (OSError, yaml.YAMLError, AttributeError) as exc:
            raise EncoderError(
                "the location holds no readable MLflow model", field="location"
            ) from exc
        if any(isinstance(conf, dict) and conf.get("code") for conf in flavors.values()):
            return True
        if "sentence_transformers" not in flavors:
            return True
    for path in folder.rglob("*"):
        if path.is_file() and not _data_file(path):
            return True
    for listing in folder.rglob("modules.json"):
        try:
            modules = json.loads(listing.read_text())
            types = [str(m["type"]) for m in modules]
        except (OSError, ValueError, TypeError, KeyError):
            return True  # unreadable: the loader's guess is not ours to trust
        if not all(t.startswith("sentence_transformers.") for t in types):
            return True
    return False


# what a model that is only data holds: configs, vocabularies, safetensors weights
DATA_SUFFIXES = {".json", ".txt", ".safetensors", ".md", ".yaml", ".yml", ".model", ".ini"}
DATA_NAMES = {"MLmodel", "LICENSE", ".gitattributes", "registered_model_meta"}
# config keys by which a loader would run code or unpickle (transformers, ST)
CODE_KEYS = {"weights_only", "trust_remote_code", "auto_map", "custom_pipelines"}


def _data_file(path: Path) -> bool:
    """A file no loader executes: pickled weights (.bin, .pt, .pkl), Python, shared
    libraries, and configs that switch on remote code or unpickling are not."""
    if path.name not in DATA_NAMES and path.suffix not in DATA_SUFFIXES:
        return False
    if path.suffix == ".json":
        try:
            return not _has_key(json.loads(path.read_text()), CODE_KEYS)
        except (OSError, ValueError):
            return False
    return True


def _has_key(value: object, keys: set[str]) -> bool:
    if isinstance(value, dict):
        return bool(keys & value.keys()) or any(_has_key(v, keys) for v in value.values())
    if isinstance(value, list):
        return any(_has_key(v, keys) for v in value)
    return False


def folder_digest(folder: Path) -> str:
    """sha256 over every file's relative path and content, in a stable order: what the
    service records when it logs a model, and checks before loading one that runs code."""
    outer = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        with path.open("rb") as f:
            inner = hashlib.file_digest(f, "sha256").hexdigest()
        outer.update(f"{path.relative_to(folder).as_posix()}\0{inner}\n".encode())
    return outer.hexdigest()


def check_code(policy: ModelPolicy, folder: Path, trusted_digest: str | None, what: str) -> None:
    """Refuse to load a model that runs code unless embcompat logged exactly these files
    (`trusted_digest`) or the operator opted in."""
    if policy.allow_code or not runs_code(folder):
        return
    if trusted_digest is not None and folder_digest(folder) == trusted_digest:
        return
    raise UntrustedModel(
        f"{what} runs Python code from its artifact when loaded, and was not logged by "
        "embcompat (or its files changed since)",
        hint="log it through embcompat's training, or set EMBCOMPAT_ALLOW_CODE_MODELS=true "
        "if you trust every admin token holder to run code in this service",
        field="location",
    )
