"""Register, list, promote model versions; record lineage; load a version's encoder.

Each write validates first (duplicate, parent, encoder output dim), then registers in
MLflow, then commits the DB row; if the DB write fails the MLflow version is deleted,
so a refused registration leaves both stores as they were.
"""

from __future__ import annotations

import re
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from embcompat.errors import (
    DuplicateVersion,
    EncoderError,
    InvalidInput,
    UnknownModel,
    UnknownVersion,
)
from embcompat.kinds import Metric, SourceKind
from embcompat.registry.encoders import (
    EXTERNAL,
    Encoder,
    PyfuncEncoder,
    SentenceTransformerEncoder,
    check_dim,
)
from embcompat.registry.mlflow_registry import MlflowRegistry
from embcompat.registry.records import ModelVersionRecord
from embcompat.registry.schema import EmbeddingModel, ModelVersion
from embcompat.registry.shipped import PARAPHRASE_L3, shipped_model_path
from embcompat.registry.trust import ST_DATA, ModelPolicy, check_code, folder_digest, local_dir

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}")


def _record(row: ModelVersion, aliases: list[str] | None = None) -> ModelVersionRecord:
    return ModelVersionRecord(
        id=row.id,
        model=row.model.name,
        version=row.version,
        dim=row.dim,
        metric=row.metric,
        normalized=row.normalized,
        encoder_uri=row.encoder_uri,
        mlflow_name=row.mlflow_name,
        mlflow_version=row.mlflow_version,
        parent=row.parent.version if row.parent else None,
        tags=dict(row.tags or {}),
        created_at=row.created_at,
        aliases=aliases or [],
        code_sha256=row.code_sha256,
    )


def _get_row(session: Session, model: str, version: str) -> ModelVersion:
    row = session.scalars(
        select(ModelVersion)
        .join(EmbeddingModel)
        .where(EmbeddingModel.name == model, ModelVersion.version == version)
    ).one_or_none()
    if row is None:
        raise UnknownVersion(
            f"model {model!r} has no version {version!r}", model=model, version=version
        )
    return row


def get_version_row(session: Session, model: str, version: str) -> ModelVersion:
    return _get_row(session, model, version)


def register_version(
    session: Session,
    registry: MlflowRegistry,
    *,
    model: str,
    version: str,
    dim: int,
    source: SourceKind,
    location: str | None = None,
    metric: Metric = Metric.COSINE,
    normalized: bool = True,
    parent: str | None = None,
    models_dir: Path,
    policy: ModelPolicy,
    tags: dict[str, str] | None = None,
    logged_here: bool = False,
) -> ModelVersionRecord:
    """Register `model:version`. `location` is a directory, a shipped name or an MLflow URI;
    a directory or MLflow model must lie inside the policy's roots. `logged_here`: the
    caller (embcompat's own training) just logged this MLflow model, so its digest is
    recorded and its code may run when it loads; never set from a request."""
    for field, value in (("model", model), ("version", version)):
        if not NAME.fullmatch(value):
            raise InvalidInput(
                f"{field} name {value!r} is not allowed",
                hint="letters, digits, '.', '_' and '-', starting with a letter or digit",
                field=field,
            )
    if dim <= 0:
        raise InvalidInput(f"dim must be positive, got {dim}", field="dim")
    Metric(metric)
    if source != "external" and not location:
        raise InvalidInput(f"source {source!r} needs a location", field="location")
    model_row = session.scalars(select(EmbeddingModel).where(EmbeddingModel.name == model)).first()
    if model_row is not None and any(v.version == version for v in model_row.versions):
        raise DuplicateVersion(
            f"model {model!r} already has a version {version!r}", model=model, version=version
        )
    parent_row = _get_row(session, model, parent) if parent else None

    meta = {
        "embcompat.version": version,
        "dim": str(dim),
        "metric": str(metric),
        "normalized": str(normalized).lower(),
        "source": source,
        **({"parent_version": parent} if parent else {}),
        **(tags or {}),
    }
    loc = location or ""  # validated above for every source that needs one
    if source == "shipped" and loc == PARAPHRASE_L3:
        raise InvalidInput(
            f"{PARAPHRASE_L3} ships as ONNX; register it with source 'external' and "
            "encode with registry.encoders.OnnxEncoder, or log it as a pyfunc first",
            field="location",
        )
    code_sha256 = None
    if source == "external":
        mlflow_version = registry.log_external(model, {"dim": dim, "metric": str(metric)}, meta)
        encoder_uri = EXTERNAL
    elif source in ("dir", "shipped"):
        if source == "dir":
            path = policy.inside(Path(loc))
            check_code(policy, path, None, f"the model at {loc!r}")
        else:
            path = shipped_model_path(loc, models_dir)
        st_encoder = SentenceTransformerEncoder.from_dir(path, normalize=normalized)
        check_dim(st_encoder, dim, f"{model}:{version}")
        mlflow_version = registry.log_sentence_transformer(st_encoder.model, model, meta)
        encoder_uri = f"models:/{model}/{mlflow_version}"
    else:
        folder = policy.inside(local_dir(loc, registry.tracking_uri))
        code_sha256 = folder_digest(folder) if logged_here else None
        check_code(policy, folder, code_sha256, f"the model at {loc!r}")
        encoder = _load_folder(folder, dim, normalized, loc)
        check_dim(encoder, dim, f"{model}:{version}", (tags or {}).get("input", "text"))
        mlflow_version = registry.register(loc, model, meta)
        encoder_uri = f"models:/{model}/{mlflow_version}"

    try:
        if model_row is None:
            model_row = EmbeddingModel(name=model)
            session.add(model_row)
        row = ModelVersion(
            model=model_row,
            version=version,
            dim=dim,
            metric=str(metric),
            normalized=normalized,
            encoder_uri=encoder_uri,
            mlflow_name=model,
            mlflow_version=mlflow_version,
            parent=parent_row,
            tags=dict(tags or {}),
            code_sha256=code_sha256,
        )
        session.add(row)
        session.flush()
    except IntegrityError as exc:
        registry.delete_version(model, mlflow_version)
        raise DuplicateVersion(f"model {model!r} already has a version {version!r}") from exc
    except BaseException:
        registry.delete_version(model, mlflow_version)
        raise
    return _record(row, registry.aliases_of(model, mlflow_version))


def list_versions(
    session: Session, registry: MlflowRegistry, model: str | None = None
) -> list[ModelVersionRecord]:
    query = select(ModelVersion).join(EmbeddingModel).order_by(EmbeddingModel.name, ModelVersion.id)
    if model is not None:
        if (
            session.scalars(select(EmbeddingModel).where(EmbeddingModel.name == model)).first()
            is None
        ):
            raise UnknownModel(f"no embedding model named {model!r}", model=model)
        query = query.where(EmbeddingModel.name == model)
    return [
        _record(r, registry.aliases_of(r.mlflow_name, r.mlflow_version) if r.mlflow_name else [])
        for r in session.scalars(query)
    ]


def get_version(
    session: Session, registry: MlflowRegistry, model: str, version: str
) -> ModelVersionRecord:
    row = _get_row(session, model, version)
    aliases = registry.aliases_of(row.mlflow_name, row.mlflow_version) if row.mlflow_name else []
    return _record(row, aliases)


def promote(
    session: Session, registry: MlflowRegistry, model: str, version: str, alias: str = "serving"
) -> ModelVersionRecord:
    """Point `alias` at `model:version`; promoting to serving records what it replaces."""
    row = _get_row(session, model, version)
    if row.mlflow_version is None:
        raise InvalidInput(f"{model}:{version} has no MLflow model version to alias")
    previous = registry.alias_version(model, alias)
    registry.set_alias(model, alias, row.mlflow_version)
    if alias == "serving" and previous and previous != row.mlflow_version:
        replaced = next((v for v in row.model.versions if v.mlflow_version == previous), None)
        if replaced is not None:
            registry.set_tag(model, row.mlflow_version, "replaces", replaced.version)
            row.tags = {**(row.tags or {}), "replaces": replaced.version}
    return _record(row, registry.aliases_of(model, row.mlflow_version))


def serving_version(
    session: Session, registry: MlflowRegistry, model: str
) -> ModelVersionRecord | None:
    mlflow_version = registry.alias_version(model, "serving")
    if mlflow_version is None:
        return None
    row = session.scalars(
        select(ModelVersion)
        .join(EmbeddingModel)
        .where(EmbeddingModel.name == model, ModelVersion.mlflow_version == mlflow_version)
    ).one_or_none()
    return _record(row, registry.aliases_of(model, mlflow_version)) if row else None


def lineage(session: Session, model: str, version: str) -> list[str]:
    """The chain of versions that led to `version`, oldest first (parent links)."""
    chain: list[str] = []
    row: ModelVersion | None = _get_row(session, model, version)
    while row is not None and row.version not in chain:
        chain.append(row.version)
        row = row.parent
    return chain[::-1]


def _load_folder(folder: Path, dim: int, normalized: bool, what: str) -> Encoder:
    """Load the MLflow model in `folder` (already checked against the policy); errors
    name `what` (a URI or a version), never the folder."""
    import mlflow

    try:
        flavors = mlflow.models.Model.load(str(folder)).flavors
        if "sentence_transformers" in flavors:
            # not MLflow's loader: it passes trust_remote_code=True
            return SentenceTransformerEncoder.from_dir(folder / ST_DATA, normalized)
        if "python_function" in flavors:
            return PyfuncEncoder(mlflow.pyfunc.load_model(str(folder)), dim, normalized)
    except Exception as exc:  # MLflow and the flavours raise many types; one edge here
        raise EncoderError(
            f"the MLflow model {what} does not load", hint=type(exc).__name__, field="location"
        ) from exc
    raise EncoderError(f"MLflow model {what} has no sentence_transformers or pyfunc flavour")


def load_encoder(
    registry: MlflowRegistry, policy: ModelPolicy, record: ModelVersionRecord
) -> Encoder:
    """Load the version's encoder (seconds to minutes) under the trust policy: callers
    keep it, as the service `Context` does, instead of calling this per request."""
    if record.external:
        raise EncoderError(
            f"{record.ref} is external: clients send its vectors, nothing can encode for it",
            hint="send vectors, or register a version with an encoder",
            version=record.ref,
        )
    folder = policy.inside(local_dir(record.encoder_uri, registry.tracking_uri))
    check_code(policy, folder, record.code_sha256, record.ref)
    return _load_folder(folder, record.dim, record.normalized, record.ref)


__all__ = [
    "get_version",
    "lineage",
    "list_versions",
    "load_encoder",
    "promote",
    "register_version",
    "serving_version",
]
