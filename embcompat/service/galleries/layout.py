"""Where a gallery lives: rows in the DB, and on disk one folder per gallery with a
vector space per model version (`vectors/v<version id>`), a mapped space per upgrade
(`vectors/v<old>-to-<new>`) and index generations beside them (`indexes/<space>`).

Stores and searchers are kept on the `Context`, so a search reuses the loaded index
generation and the snapshot of rows added since instead of reading them again."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from embcompat.errors import InvalidInput, UnknownGallery
from embcompat.index.faiss_index import IndexGenerations, IndexMetric, SpaceSearcher
from embcompat.index.store import SpaceStore
from embcompat.kinds import IndexKind
from embcompat.registry import versions
from embcompat.registry.records import ModelVersionRecord
from embcompat.registry.schema import Gallery, ModelVersion
from embcompat.service.context import Context


def space_name(version_id: int) -> str:
    return f"v{version_id}"


def gallery_dir(ctx: Context, gallery: str) -> Path:
    return ctx.data_dir / "galleries" / gallery


def space_store(ctx: Context, gallery: str, version: ModelVersionRecord) -> SpaceStore:
    return ctx.spaces.open(
        gallery_dir(ctx, gallery) / "vectors" / space_name(version.id), version.dim
    )


def mapped_store(
    ctx: Context, gallery: str, old: ModelVersionRecord, new: ModelVersionRecord
) -> SpaceStore:
    """Old vectors mapped into the new space: a space of its own, `v<old>-to-<new>`."""
    root = gallery_dir(ctx, gallery) / "vectors" / f"v{old.id}-to-{new.id}"
    return ctx.spaces.open(root, new.dim)


def space_searcher(
    ctx: Context, gallery: str, version: ModelVersionRecord, kind: str = IndexKind.FLAT
) -> SpaceSearcher:
    """The context's searcher of one space (its files are re-checked on every search)."""
    store = space_store(ctx, gallery, version)
    metric: IndexMetric = "l2" if version.metric == "l2" else "ip"
    root = gallery_dir(ctx, gallery) / "indexes" / space_name(version.id)
    return _searcher(ctx, store, root, IndexKind(kind), metric)


def mapped_searcher(
    ctx: Context, gallery: str, old: ModelVersionRecord, new: ModelVersionRecord, kind: str
) -> SpaceSearcher:
    store = mapped_store(ctx, gallery, old, new)
    root = gallery_dir(ctx, gallery) / "indexes" / store.root.name
    return _searcher(ctx, store, root, IndexKind(kind), "ip")


def _searcher(
    ctx: Context, store: SpaceStore, root: Path, kind: IndexKind, metric: IndexMetric
) -> SpaceSearcher:
    key = (root.resolve(), kind, metric)
    searcher = ctx.cached(
        "searcher", key, lambda: SpaceSearcher(store, IndexGenerations(root, kind, metric))
    )
    if searcher.store is not store:  # the space was re-created under the same path
        ctx.forget("searcher", key)
        searcher = ctx.cached(
            "searcher", key, lambda: SpaceSearcher(store, IndexGenerations(root, kind, metric))
        )
    return searcher


def get_gallery_row(session: Session, name: str) -> Gallery:
    row = session.scalars(select(Gallery).where(Gallery.name == name)).one_or_none()
    if row is None:
        raise UnknownGallery(f"no gallery named {name!r}", gallery=name)
    return row


def gallery_row_by_id(session: Session, gallery_id: int | None) -> Gallery:
    row = session.get(Gallery, gallery_id)
    if row is None:
        raise UnknownGallery(f"gallery {gallery_id} is gone", gallery=gallery_id)
    return row


def version_record(ctx: Context, session: Session, version_id: int | None) -> ModelVersionRecord:
    row = session.get(ModelVersion, version_id) if version_id is not None else None
    if row is None:
        raise InvalidInput(f"model version id {version_id} is gone")
    return versions.get_version(session, ctx.registry, row.model.name, row.version)
