"""SQLAlchemy 2 typed ORM: the metadata ledger. ORM rows never leave registry/ and the
service layer; callers get the plain records of `registry.records`.

States and kinds are stored as short strings and validated through the StrEnums of
`embcompat.kinds`,
so the same schema works on SQLite and PostgreSQL without native enum types.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from embcompat.kinds import ACTIVE_STATES, AdapterStatus, ChunkState, JobState, Metric

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dict[str, Any]: JSON, datetime: DateTime(timezone=True)}


class EmbeddingModel(Base):
    __tablename__ = "embedding_models"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    versions: Mapped[list[ModelVersion]] = relationship(
        back_populates="model", order_by="ModelVersion.id"
    )


class ModelVersion(Base):
    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("model_id", "version"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("embedding_models.id", ondelete="CASCADE"))
    version: Mapped[str] = mapped_column(String(100))
    dim: Mapped[int] = mapped_column(Integer)
    metric: Mapped[str] = mapped_column(String(16), default=Metric.COSINE)
    normalized: Mapped[bool] = mapped_column(Boolean, default=True)
    # an MLflow model URI, or "external" when clients send the vectors themselves
    encoder_uri: Mapped[str] = mapped_column(String(1000))
    mlflow_name: Mapped[str | None] = mapped_column(String(200))
    mlflow_version: Mapped[str | None] = mapped_column(String(50))
    parent_id: Mapped[int | None] = mapped_column(
        ForeignKey("model_versions.id", ondelete="SET NULL")
    )
    tags: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # set only when embcompat logged the model itself: its loading may run its code
    code_sha256: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    model: Mapped[EmbeddingModel] = relationship(back_populates="versions")
    parent: Mapped[ModelVersion | None] = relationship(remote_side="ModelVersion.id")


class AdapterRow(Base):
    __tablename__ = "adapters"
    __table_args__ = (Index("ix_adapters_pair", "from_version_id", "to_version_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    from_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    to_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    kind: Mapped[str] = mapped_column(String(32))
    direction: Mapped[str] = mapped_column(String(32))
    mlflow_model_uri: Mapped[str | None] = mapped_column(String(1000))
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    status: Mapped[str] = mapped_column(String(16), default=AdapterStatus.TRAINED)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Gallery(Base):
    __tablename__ = "galleries"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("embedding_models.id"))
    # the version whose vectors queries are served against
    serving_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    index_kind: Mapped[str] = mapped_column(String(16), default="flat")
    plan: Mapped[str | None] = mapped_column(String(32))
    # +1 in every transaction that writes its items: readers' caches (the metadata
    # index) know from one row whether they are current
    items_version: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class GalleryProbe(Base):
    """A labelled probe of a gallery: queries with their relevant item ids, [{"text",
    "relevant"}], kept apart from the gallery row that every search reads."""

    __tablename__ = "gallery_probes"

    gallery_id: Mapped[int] = mapped_column(
        ForeignKey("galleries.id", ondelete="CASCADE"), primary_key=True
    )
    queries: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class VersionReport(Base):
    """What upgrading each gallery served by the model to this version would do, measured
    when the version was registered (state pending, done or failed)."""

    __tablename__ = "version_reports"

    version_id: Mapped[int] = mapped_column(
        ForeignKey("model_versions.id", ondelete="CASCADE"), primary_key=True
    )
    state: Mapped[str] = mapped_column(String(16))
    report: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64))
    error: Mapped[str | None] = mapped_column(Text)
    requested_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]


class TrainingRun(Base):
    """A compatible training run (`embcompat train-compatible`): its request, progress
    (steps done of total), and the version it registered (state pending, running, done
    or failed). The training pairs live in a file under the data dir, not here."""

    __tablename__ = "training_runs"

    id: Mapped[int] = mapped_column(primary_key=True)
    old_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id", ondelete="CASCADE"))
    version: Mapped[str] = mapped_column(String(200))  # to register under old's model
    state: Mapped[str] = mapped_column(String(16))
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    steps_done: Mapped[int] = mapped_column(Integer, default=0)
    steps_total: Mapped[int] = mapped_column(Integer, default=0)
    result: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # the lease: the last sign of life of the process training it (or of its dispatch)
    heartbeat_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]


class Item(Base):
    __tablename__ = "items"
    __table_args__ = (
        UniqueConstraint("gallery_id", "external_id"),
        Index("ix_items_gallery_version", "gallery_id", "vector_version_id"),
        Index("ix_items_gallery_meta_seq", "gallery_id", "meta_seq"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    gallery_id: Mapped[int] = mapped_column(ForeignKey("galleries.id", ondelete="CASCADE"))
    external_id: Mapped[str] = mapped_column(String(500))
    # the raw item (text, or a reference) kept so the item can be re-embedded later
    payload: Mapped[str | None] = mapped_column(Text)
    # flat key -> value attributes that searches filter on (category, tenant, ...)
    meta: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    vector_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    # the gallery's items_version when this row was last written: the metadata index
    # catches up by reading the rows stamped after the version it was built at
    meta_seq: Mapped[int] = mapped_column(default=0, server_default=text("0"))


class ItemDeletion(Base):
    """An item deleted at a gallery's items_version `seq` (what the metadata index of an
    older version must drop)."""

    __tablename__ = "item_deletions"
    __table_args__ = (Index("ix_item_deletions_gallery_seq", "gallery_id", "seq"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    gallery_id: Mapped[int] = mapped_column(ForeignKey("galleries.id", ondelete="CASCADE"))
    item_id: Mapped[int]
    seq: Mapped[int]


ACTIVE_UPGRADE = text(
    "kind = 'upgrade' AND state IN ("
    + ", ".join(f"'{s.value}'" for s in sorted(ACTIVE_STATES))
    + ")"
)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_gallery_state", "gallery_id", "state"),
        # one active upgrade per gallery, enforced by the database itself
        Index(
            "uq_jobs_one_active_upgrade",
            "gallery_id",
            unique=True,
            sqlite_where=ACTIVE_UPGRADE,
            postgresql_where=ACTIVE_UPGRADE,
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    gallery_id: Mapped[int | None] = mapped_column(ForeignKey("galleries.id", ondelete="CASCADE"))
    from_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    to_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    state: Mapped[str] = mapped_column(String(32), default=JobState.PLANNED)
    plan: Mapped[str | None] = mapped_column(String(32))
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    report: Mapped[dict[str, Any]] = mapped_column(default=dict)
    items_total: Mapped[int] = mapped_column(Integer, default=0)
    items_done: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    started_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()


class JobChunk(Base):
    __tablename__ = "job_chunks"
    __table_args__ = (UniqueConstraint("job_id", "seq"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(Integer)
    # half-open range [start, stop) over the job's ordered item list
    start: Mapped[int] = mapped_column(Integer)
    stop: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16), default=ChunkState.PENDING)
    items_done: Mapped[int] = mapped_column(Integer, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class AuditEvent(Base):
    """One admin action: who (the token's name, never the token), what, and how it ended."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(100), index=True)
    action: Mapped[str] = mapped_column(String(100))
    method: Mapped[str] = mapped_column(String(10))
    path: Mapped[str] = mapped_column(String(1000))
    status: Mapped[int] = mapped_column(Integer)
    request_id: Mapped[str] = mapped_column(String(32))
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)
