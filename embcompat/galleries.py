"""Galleries: create, ingest (encode or accept vectors), delete items, stats.

The DB holds each item's external id and raw payload (kept for re-embedding); vectors
live in the vector store, one space per model version (`v<version id>`), and the FAISS
index generations beside them. Ingest is idempotent on the external id.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from embcompat.adapters.base import check_vectors
from embcompat.context import Context
from embcompat.errors import (
    Conflict,
    DuplicateItem,
    InvalidInput,
    UnknownGallery,
    UnknownItem,
)
from embcompat.index.binary import binarizer_metrics
from embcompat.index.faiss_index import KINDS as INDEX_KINDS
from embcompat.index.faiss_index import IndexGenerations, IndexKind, IndexMetric, SpaceSearcher
from embcompat.index.store import SpaceStore, open_space
from embcompat.registry import versions
from embcompat.registry.records import ModelVersionRecord
from embcompat.registry.schema import Adapter as AdapterRow
from embcompat.registry.schema import AdapterStatus, EmbeddingModel, Gallery, Item, ModelVersion


@dataclass(frozen=True)
class ItemIn:
    id: str
    text: str | None = None
    vector: Sequence[float] | None = None
    metadata: dict[str, Any] | None = None  # flat attributes for filtered search


@dataclass(frozen=True)
class GalleryRecord:
    id: int
    name: str
    model: str
    serving_version: str
    index_kind: str
    plan: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def space_name(version_id: int) -> str:
    return f"v{version_id}"


def gallery_dir(ctx: Context, gallery: str) -> Path:
    return ctx.data_dir / "galleries" / gallery


def space_store(ctx: Context, gallery: str, version: ModelVersionRecord) -> SpaceStore:
    return open_space(gallery_dir(ctx, gallery) / "vectors" / space_name(version.id), version.dim)


_SEARCHERS: dict[tuple[Path, str, str], SpaceSearcher] = {}


def space_searcher(
    ctx: Context, gallery: str, version: ModelVersionRecord, kind: str = "flat"
) -> SpaceSearcher:
    """The process's searcher of one space: kept, so its loaded index generation and its
    view of the rows added since are shared by every search instead of re-read per call
    (both are re-checked against the files on every search)."""
    store = space_store(ctx, gallery, version)
    metric: IndexMetric = "l2" if version.metric == "l2" else "ip"
    root = gallery_dir(ctx, gallery) / "indexes" / space_name(version.id)
    key = (root.resolve(), kind, metric)
    searcher = _SEARCHERS.get(key)
    if searcher is None or searcher.store is not store:
        index_kind = cast(IndexKind, kind)  # validated when the gallery was created
        searcher = _SEARCHERS[key] = SpaceSearcher(
            store, IndexGenerations(root, index_kind, metric)
        )
    return searcher


def get_gallery_row(session: Session, name: str) -> Gallery:
    row = session.scalars(select(Gallery).where(Gallery.name == name)).one_or_none()
    if row is None:
        raise UnknownGallery(f"no gallery named {name!r}", gallery=name)
    return row


def version_record(ctx: Context, session: Session, version_id: int | None) -> ModelVersionRecord:
    row = session.get(ModelVersion, version_id) if version_id is not None else None
    if row is None:
        raise InvalidInput(f"model version id {version_id} is gone")
    return versions.get_version(session, ctx.registry, row.model.name, row.version)


def _record(session: Session, row: Gallery) -> GalleryRecord:
    model = session.get(EmbeddingModel, row.model_id)
    serving = session.get(ModelVersion, row.serving_version_id)
    return GalleryRecord(
        row.id,
        row.name,
        model.name if model else "?",
        serving.version if serving else "?",
        row.index_kind,
        row.plan,
    )


def create_gallery(
    ctx: Context, name: str, model: str, version: str, index_kind: IndexKind = "flat"
) -> GalleryRecord:
    with ctx.session() as s:
        if s.scalars(select(Gallery).where(Gallery.name == name)).first() is not None:
            raise Conflict(f"a gallery named {name!r} already exists", gallery=name)
        if index_kind not in INDEX_KINDS:
            raise InvalidInput(
                f"unknown index kind {index_kind!r}",
                hint=f"one of {', '.join(INDEX_KINDS)}",
                field="index_kind",
            )
        mv = versions.get_version_row(s, model, version)
        row = Gallery(
            name=name, model_id=mv.model_id, serving_version_id=mv.id, index_kind=index_kind
        )
        s.add(row)
        s.flush()
        return _record(s, row)


def get_gallery(ctx: Context, name: str) -> GalleryRecord:
    with ctx.session() as s:
        return _record(s, get_gallery_row(s, name))


def list_galleries(ctx: Context) -> list[GalleryRecord]:
    with ctx.session() as s:
        return [_record(s, g) for g in s.scalars(select(Gallery).order_by(Gallery.name))]


def encode_items(ctx: Context, version: ModelVersionRecord, items: Sequence[ItemIn]) -> np.ndarray:
    """Vectors for items in `version`'s space: sent vectors for an external version or
    one whose input is not text (an image model: items keep text payloads only, so the
    client sends the vectors), else the version's encoder over the texts."""
    text_input = version.tags.get("input", "text") == "text"
    if version.external or not text_input:
        missing = [it.id for it in items if it.vector is None]
        if missing:
            why = "is external" if version.external else f"encodes {version.tags['input']}"
            raise InvalidInput(
                f"{version.ref} {why}: item {missing[0]!r} needs a vector", field="vector"
            )
        return check_vectors([it.vector for it in items], version.dim, f"vectors for {version.ref}")
    missing = [it.id for it in items if not it.text]
    if missing:
        raise InvalidInput(f"item {missing[0]!r} needs a text to encode", field="text")
    if any(it.vector is not None for it in items):
        raise InvalidInput(f"{version.ref} encodes texts itself; send texts, not vectors")
    encoder = versions.load_encoder(ctx.registry, version)
    return encoder.encode([it.text for it in items], ctx.settings.encode_batch_size)  # type: ignore[misc]


def _check_batch(ctx: Context, items: Sequence[ItemIn]) -> list[str]:
    if len(items) > ctx.settings.max_batch_items:
        raise InvalidInput(
            f"batch of {len(items)} items exceeds the limit of {ctx.settings.max_batch_items}",
            field="items",
        )
    ids = [it.id for it in items]
    for it in items:
        _check_metadata(it)
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DuplicateItem(f"item id {dup!r} appears twice in one batch", item=dup)
    return ids


MetaValue = str | int | float | bool
Filters = dict[str, MetaValue | list[MetaValue]]


def _check_metadata(item: ItemIn) -> None:
    meta = item.metadata
    if meta is None:
        return
    if not isinstance(meta, dict):
        raise InvalidInput(f"item {item.id!r}: metadata must be an object", field="metadata")
    for key, value in meta.items():
        if not isinstance(key, str) or not 0 < len(key) <= 100:
            raise InvalidInput(f"item {item.id!r}: metadata key {key!r} is not allowed")
        if not isinstance(value, MetaValue):  # type: ignore[arg-type]
            raise InvalidInput(
                f"item {item.id!r}: metadata {key!r} must be a string, number or bool, "
                f"not {type(value).__name__}",
                field="metadata",
            )


def excluded_by(ctx: Context, gallery: str, filters: Filters | None) -> np.ndarray | None:
    """The item ids a search with `filters` must never return (None: no filter).

    filters: {key: value} (equal) or {key: [values]} (any of), all keys must hold;
    the key `id` matches item ids. Items without the key do not match."""
    if not filters:
        return None
    if not isinstance(filters, dict):
        raise InvalidInput("filters must be an object of key: value or [values]", field="filters")
    wanted: dict[str, set[MetaValue]] = {}
    for key, value in filters.items():
        values = value if isinstance(value, list) else [value]
        if not values or not all(isinstance(v, MetaValue) for v in values):  # type: ignore[arg-type]
            raise InvalidInput(
                f"filter {key!r} needs a string, number or bool, or a non-empty list of them",
                field="filters",
            )
        wanted[key] = set(values)
    with ctx.session() as s:
        g = get_gallery_row(s, gallery)
        rows = s.execute(
            select(Item.id, Item.external_id, Item.meta).where(Item.gallery_id == g.id)
        ).all()
    out = [
        i
        for i, ext, meta in rows
        if not all(
            (ext if key == "id" else (meta or {}).get(key, _MISSING)) in values
            for key, values in wanted.items()
        )
    ]
    return np.array(sorted(out), np.int64)


_MISSING = object()


def stage(ctx: Context, gallery: str, items: Sequence[ItemIn]) -> int:
    """Store raw items (texts) without vectors, for the `ingest` task to encode in chunks
    on the workers; idempotent on item id. Returns how many are staged."""
    ids = _check_batch(ctx, items)
    missing = [it.id for it in items if not it.text or it.vector is not None]
    if missing:
        raise InvalidInput(f"staged item {missing[0]!r} needs a text and no vector", field="text")
    with ctx.session() as s:
        g = get_gallery_row(s, gallery)
        existing = {
            r.external_id: r
            for r in s.scalars(
                select(Item).where(Item.gallery_id == g.id, Item.external_id.in_(ids))
            )
        }
        for it in items:
            row = existing.get(it.id) or Item(gallery_id=g.id, external_id=it.id)
            if row.payload != it.text or row.vector_version_id is None:
                row.payload, row.vector_version_id = it.text, None
            if it.metadata is not None:
                row.meta = it.metadata
            s.add(row)
    return len(items)


def encode_staged(ctx: Context, gallery: str, limit: int = 1000) -> int:
    """Encode up to `limit` staged items and store their vectors; returns how many."""
    with ctx.session() as s:
        g = get_gallery_row(s, gallery)
        rows = s.execute(
            select(Item.external_id, Item.payload)
            .where(
                Item.gallery_id == g.id, Item.vector_version_id.is_(None), Item.payload.is_not(None)
            )
            .order_by(Item.id)
            .limit(limit)
        ).all()
    if rows:
        ingest(ctx, gallery, [ItemIn(ext, text) for ext, text in rows])
    return len(rows)


def ingest(ctx: Context, gallery: str, items: Sequence[ItemIn]) -> dict[str, int]:
    """Add or update items (idempotent on item id). Everything is validated and encoded
    before anything is written; vectors are stored before the DB commit."""
    if not items:
        return {"added": 0, "updated": 0}
    ids = _check_batch(ctx, items)
    with ctx.session() as s:
        g = get_gallery_row(s, gallery)
        serving = version_record(ctx, s, g.serving_version_id)
        targets = [serving]
        from embcompat import upgrades  # import here: upgrades builds on galleries

        job = upgrades.active_job_row(s, g.id)
        if job is not None and job.to_version_id is not None:
            targets.append(version_record(ctx, s, job.to_version_id))
        vectors = [encode_items(ctx, v, items) for v in targets]
        existing = {
            r.external_id: r
            for r in s.scalars(
                select(Item).where(Item.gallery_id == g.id, Item.external_id.in_(ids))
            )
        }
        rows = []
        for it in items:
            row = existing.get(it.id) or Item(gallery_id=g.id, external_id=it.id)
            row.payload = it.text
            if it.metadata is not None:
                row.meta = it.metadata
            row.vector_version_id = targets[-1].id
            s.add(row)
            rows.append(row)
        s.flush()
        db_ids = np.array([r.id for r in rows], np.int64)
        for version, vecs in zip(targets, vectors, strict=True):
            space_store(ctx, gallery, version).add(db_ids, vecs, replace=True)
        return {"added": len(items) - len(existing), "updated": len(existing)}


def delete_items(ctx: Context, gallery: str, external_ids: Sequence[str]) -> int:
    with ctx.session() as s:
        g = get_gallery_row(s, gallery)
        rows = list(
            s.scalars(
                select(Item).where(Item.gallery_id == g.id, Item.external_id.in_(external_ids))
            )
        )
        found = {r.external_id for r in rows}
        missing = [e for e in external_ids if e not in found]
        if missing:
            raise UnknownItem(f"gallery {gallery!r} has no item {missing[0]!r}", item=missing[0])
        db_ids = np.array([r.id for r in rows], np.int64)
        for space in (gallery_dir(ctx, gallery) / "vectors").glob("v*"):
            SpaceStore(space).delete(db_ids)
        for r in rows:
            s.delete(r)
        return len(rows)


def publish(ctx: Context, gallery: str) -> dict[str, int]:
    """Build and publish a new index generation for every space of the gallery."""
    out = {}
    with ctx.session() as s:
        g = get_gallery_row(s, gallery)
        kind = g.index_kind
    for space in sorted((gallery_dir(ctx, gallery) / "vectors").glob("v*")):
        if not space.name[1:].isdigit():
            continue  # a mapped space is searched from the store until its job finishes
        version_id = int(space.name[1:])
        with ctx.session() as s:
            rec = version_record(ctx, s, version_id)
        searcher = space_searcher(ctx, gallery, rec, kind)
        gens = searcher.generations
        out[space.name] = gens.publish(searcher.store)
        if gens.fitted_binarizer is not None:
            _register_binarizer(ctx, gens, rec, searcher.store.snapshot().vectors)
    return out


def _register_binarizer(
    ctx: Context, gens: IndexGenerations, version: ModelVersionRecord, vectors: np.ndarray
) -> None:
    """A binary index fitted its binarizer: register it in MLflow beside the adapters,
    with what it keeps of the space's own float neighbours."""
    binarizer = gens.fitted_binarizer
    assert binarizer is not None
    tags = {
        "from": version.ref,
        "to": f"{binarizer.kind}:{binarizer.bits}bits",
        "direction": binarizer.direction,
        "kind": binarizer.kind,
        "bits_per_dim": str(binarizer.bits_per_dim),
    }
    metrics = binarizer_metrics(binarizer, np.asarray(vectors))
    uri = ctx.registry.log_folder_version(
        f"{version.model}-binarizer", gens.root / "binarizer", tags, metrics
    )
    with ctx.session() as s:
        s.add(
            AdapterRow(
                from_version_id=version.id,
                to_version_id=version.id,
                kind=binarizer.kind,
                direction=binarizer.direction,
                mlflow_model_uri=uri,
                metrics=metrics,
                status=AdapterStatus.ACCEPTED,
            )
        )


def stats(ctx: Context, gallery: str) -> dict[str, Any]:
    with ctx.session() as s:
        g = get_gallery_row(s, gallery)
        per_version = dict(
            s.execute(
                select(ModelVersion.version, func.count(Item.id))
                .join(Item, Item.vector_version_id == ModelVersion.id)
                .where(Item.gallery_id == g.id)
                .group_by(ModelVersion.version)
            ).all()
        )
        total = s.scalar(select(func.count(Item.id)).where(Item.gallery_id == g.id)) or 0
    root = gallery_dir(ctx, gallery)
    size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) if root.exists() else 0
    spaces = {}
    for space in sorted((root / "vectors").glob("v*")):
        gens = IndexGenerations(root / "indexes" / space.name)
        spaces[space.name] = {
            "vectors": len(SpaceStore(space)),
            "generation": gens.current_number(),
        }
    return {
        "gallery": gallery,
        "items": total,
        "items_per_version": per_version,
        "spaces": spaces,
        "bytes_on_disk": size,
    }
