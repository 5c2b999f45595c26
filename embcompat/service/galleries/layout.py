"""Where a gallery lives: rows in the DB, and on disk one folder per gallery with a
vector space per model version (`vectors/v<version id>`), a mapped space per upgrade
(`vectors/v<old>-to-<new>`) and index generations beside them (`indexes/<space>`).

Stores and searchers are kept on the `Context`, so a search reuses the loaded index
generation and the snapshot of rows added since instead of reading them again."""

from __future__ import annotations

import fcntl
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from embcompat.errors import InvalidInput, UnknownGallery
from embcompat.index.faiss_index import IndexGenerations, IndexMetric, SpaceSearcher
from embcompat.index.store import MANIFEST, SpaceStore
from embcompat.kinds import IndexKind
from embcompat.registry import versions
from embcompat.registry.db import row_lock
from embcompat.registry.records import ModelVersionRecord
from embcompat.registry.schema import Gallery, Item, ModelVersion
from embcompat.service.context import Context


def space_name(version_id: int) -> str:
    return f"v{version_id}"


def gallery_dir(ctx: Context, gallery: str) -> Path:
    return ctx.data_dir / "galleries" / gallery


def space_where(gallery: str, space: str) -> dict[str, str]:
    """How errors name a space: by gallery and space, never by server path."""
    return {"gallery": gallery, "space": space}


def space_store(ctx: Context, gallery: str, version: ModelVersionRecord) -> SpaceStore:
    name = space_name(version.id)
    return ctx.spaces.open(
        gallery_dir(ctx, gallery) / "vectors" / name, version.dim, space_where(gallery, name)
    )


def mapped_space_name(old: ModelVersionRecord, new: ModelVersionRecord, job_id: int) -> str:
    return f"v{old.id}-to-{new.id}-job{job_id}"


def mapped_store(
    ctx: Context,
    gallery: str,
    old: ModelVersionRecord,
    new: ModelVersionRecord,
    job_id: int,
    folded: bool = False,
    create: bool = True,
) -> SpaceStore:
    """Old vectors mapped into the new space by one job's mapper: a space of that job
    only, so no later job takes vectors mapped by another adapter for its own. `folded`:
    a linear mapper's space, one scale per item (`index.folded`) instead of a vector.
    `create=False` (searches): the space as it is on disk, `UnknownSpace` once the
    job's end dropped it; a search never leaves an empty space behind."""
    name = mapped_space_name(old, new, job_id)
    dim = (1 if folded else new.dim) if create else None
    return ctx.spaces.open(
        gallery_dir(ctx, gallery) / "vectors" / name, dim, space_where(gallery, name)
    )


def mapped_dim(
    ctx: Context, gallery: str, old: ModelVersionRecord, new: ModelVersionRecord, job_id: int
) -> int | None:
    """The width of the job's mapped space on disk (1: folded), None before it exists."""
    root = gallery_dir(ctx, gallery) / "vectors" / mapped_space_name(old, new, job_id)
    return ctx.spaces.open(root).dim if (root / MANIFEST).exists() else None


def space_searcher(
    ctx: Context, gallery: str, version: ModelVersionRecord, kind: str = IndexKind.FLAT
) -> SpaceSearcher:
    """The context's searcher of one space (its files are re-checked on every search)."""
    store = space_store(ctx, gallery, version)
    metric: IndexMetric = "l2" if version.metric == "l2" else "ip"
    root = gallery_dir(ctx, gallery) / "indexes" / space_name(version.id)
    return _searcher(ctx, store, root, IndexKind(kind), metric)


def mapped_searcher(
    ctx: Context,
    gallery: str,
    old: ModelVersionRecord,
    new: ModelVersionRecord,
    job_id: int,
    kind: str,
    create: bool = True,
) -> SpaceSearcher:
    store = mapped_store(ctx, gallery, old, new, job_id, create=create)
    root = gallery_dir(ctx, gallery) / "indexes" / store.root.name
    return _searcher(ctx, store, root, IndexKind(kind), "ip")


def _searcher(
    ctx: Context, store: SpaceStore, root: Path, kind: IndexKind, metric: IndexMetric
) -> SpaceSearcher:
    key = (root.resolve(), kind, metric)

    def build() -> SpaceSearcher:
        gens = IndexGenerations(root, kind, metric, store.where)
        return SpaceSearcher(store, gens, on_fallback=ctx.health.index_fallback)

    searcher = ctx.cached("searcher", key, build)
    if searcher.store is not store:  # the space was re-created under the same path
        ctx.forget("searcher", key)
        searcher = ctx.cached("searcher", key, build)
    return searcher


@contextmanager
def gallery_lock(ctx: Context, gallery: str) -> Iterator[None]:
    """Serialise the writers of one gallery (ingest, stage, delete, encode-and-store,
    upgrade start, repair) across threads and processes sharing the data directory, so
    the DB and the vector store change together. Taken before any DB transaction opens,
    so each writer's transaction sees the one before it committed."""
    folder = gallery_dir(ctx, gallery)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".writer.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def get_gallery_row(session: Session, name: str, lock: bool = False) -> Gallery:
    """The gallery's row; `lock` also takes its row lock where the database has them
    (PostgreSQL: writers on hosts that do not share the lock file)."""
    query = select(Gallery).where(Gallery.name == name)
    row = session.scalars(row_lock(query, session) if lock else query).one_or_none()
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


def known_version(ctx: Context, session: Session, version_id: int | None) -> ModelVersionRecord:
    """A version's record, kept per context: what searches and upgrade steps read of it
    (dim, metric, encoder, tags) is fixed at registration (rows are never deleted), and
    asking MLflow's registry for its aliases cost 15-20 ms a call, more than a search of
    100,000 vectors or a tenth of a map step. Its `aliases` may be stale."""
    return ctx.cached("version", version_id, lambda: version_record(ctx, session, version_id))


SQL_CHUNK = 10_000  # names per IN (...): PostgreSQL binds 65,535 at most, SQLite as built 250k


def item_ids_of(s: Session, gallery_id: int, names: Sequence[str]) -> dict[str, int]:
    """{external id: item id} for the gallery's items among `names`, looked up SQL_CHUNK
    names at a time (a probe can name more items than one statement may bind)."""
    found: dict[str, int] = {}
    for start in range(0, len(names), SQL_CHUNK):
        part = list(names[start : start + SQL_CHUNK])
        query = select(Item.external_id, Item.id).where(
            Item.gallery_id == gallery_id, Item.external_id.in_(part)
        )
        found.update({ext: int(i) for ext, i in s.execute(query)})
    return found
