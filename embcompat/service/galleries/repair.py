"""Finding and mending damaged gallery files.

`check` is cheap (manifests and index pointers, for `/ready`), `verify` reads every
shard against its checksum and loads every index generation, and `repair` rebuilds each
version space from what is sound: vectors from intact shards whose content fingerprint
still matches the item's payload, the rest encoded again from the stored payloads (a
version without an encoder cannot: those items are named in the report). The rebuilt
space replaces the damaged one by rename, and a fresh index generation is published.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select

from embcompat.errors import CorruptArtifact, EncoderError, InvalidInput, UnknownSpace
from embcompat.index.faiss_index import IndexGenerations
from embcompat.index.store import SpaceStore
from embcompat.registry.records import ModelVersionRecord
from embcompat.registry.schema import Gallery, Item
from embcompat.service.context import Context
from embcompat.service.galleries.filters import forget_meta_index
from embcompat.service.galleries.items import content_hash
from embcompat.service.galleries.layout import (
    gallery_dir,
    gallery_lock,
    get_gallery_row,
    space_searcher,
    space_where,
    version_record,
)

ENCODE_BATCH = 256
NAMED_AT_MOST = 100  # unrebuildable items named in a report


def check(ctx: Context, gallery: str) -> dict[str, str]:
    """space -> problem, from the small files only (manifests, index pointers)."""
    root = gallery_dir(ctx, gallery)
    problems = {}
    for space in sorted((root / "vectors").glob("v*")):
        try:
            SpaceStore(space, where=space_where(gallery, space.name))
            IndexGenerations(
                root / "indexes" / space.name, where=space_where(gallery, space.name)
            ).current_number()
        except CorruptArtifact as exc:
            problems[space.name] = exc.message
        except (InvalidInput, UnknownSpace, OSError):  # no manifest at all
            problems[space.name] = f"gallery {gallery!r}, space {space.name!r}: no manifest"
    return problems


def degraded(ctx: Context) -> dict[str, dict[str, str]]:
    """gallery -> {space: problem}: what this process met, and what `check` finds now."""
    out = ctx.health.degraded()
    with ctx.session() as s:
        names = list(s.scalars(select(Gallery.name)))
    for name in names:
        for space, problem in check(ctx, name).items():
            out.setdefault(name, {})[space] = problem
    return out


def verify(ctx: Context, gallery: str) -> dict[str, str]:
    """space -> problem, reading every shard against its checksum and loading every
    current index generation (as long as the gallery is big: run it off-peak)."""
    with ctx.session() as s:
        g = get_gallery_row(s, gallery)
        kind = g.index_kind
    problems = check(ctx, gallery)
    for space in sorted((gallery_dir(ctx, gallery) / "vectors").glob("v*")):
        if space.name in problems:
            continue
        try:
            store = ctx.spaces.open(space, where=space_where(gallery, space.name))
            store.verify()
            if space.name[1:].isdigit():
                with ctx.session() as s:
                    rec = version_record(ctx, s, int(space.name[1:]))
                space_searcher(ctx, gallery, rec, kind).generations.load(store)
        except CorruptArtifact as exc:
            problems[space.name] = exc.message
            ctx.health.report(exc)
    return problems


def repair(ctx: Context, gallery: str) -> dict[str, Any]:
    """Rebuild every version space of the gallery from its sound vectors and the stored
    payloads, publish a fresh index generation for each; returns what was done."""
    report: dict[str, Any] = {}
    with gallery_lock(ctx, gallery):
        with ctx.session() as s:
            g = get_gallery_row(s, gallery)
            live = dict(
                s.execute(select(Item.id, Item.payload).where(Item.gallery_id == g.id))
                .tuples()
                .all()
            )
            names = {i: e for i, e in s.execute(
                select(Item.id, Item.external_id).where(Item.gallery_id == g.id)
            ).tuples()}  # fmt: skip
            spaces = sorted((gallery_dir(ctx, gallery) / "vectors").glob("v*"))
            versions = {
                p.name: version_record(ctx, s, int(p.name[1:]))
                for p in spaces
                if p.name[1:].isdigit()
            }
        for name, version in versions.items():
            report[name] = _rebuild(ctx, gallery, version, live, names)
    ctx.health.clear(gallery)
    forget_meta_index(ctx, gallery)  # derived from the items: rebuilt by the next filter
    for name, version in versions.items():
        with ctx.session() as s:
            kind = get_gallery_row(s, gallery).index_kind
        searcher = space_searcher(ctx, gallery, version, kind)
        report[name]["generation"] = searcher.generations.publish(searcher.store)
    return report


def _salvage(
    root: Path, dim: int, where: dict[str, str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, vectors, sources) of every shard of `root` that passes its checks (none
    when the manifest itself is lost)."""
    try:
        shards = SpaceStore(root, dim, where).intact_shards()
    except (CorruptArtifact, InvalidInput):
        shards = []
    return (
        np.concatenate([np.zeros(0, np.int64), *(s.ids for s in shards)]),
        np.concatenate([np.zeros((0, dim), np.float32), *(np.asarray(s.vectors) for s in shards)]),
        np.concatenate([np.zeros(0, np.uint64), *(s.sources for s in shards)]),
    )


def _rebuild(
    ctx: Context,
    gallery: str,
    version: ModelVersionRecord,
    live: dict[int, str | None],
    names: dict[int, str],
) -> dict[str, Any]:
    root = gallery_dir(ctx, gallery) / "vectors" / f"v{version.id}"
    where = space_where(gallery, root.name)
    ids, vecs, srcs = _salvage(root, version.dim, where)
    want = np.array([content_hash(live.get(int(i))) for i in ids], np.uint64)
    sound = np.isin(ids, list(live)) & ((srcs == want) | (srcs == 0))
    ids, vecs, srcs = ids[sound], vecs[sound], srcs[sound]
    ids, first = np.unique(ids, return_index=True)  # one vector per item
    vecs, srcs = vecs[first], srcs[first]
    missing = np.array(sorted(set(live) - set(ids.tolist())), np.int64)
    encodable = np.array([i for i in missing if live.get(int(i))], np.int64)
    encoded = np.zeros((0, version.dim), np.float32)
    if len(encodable):
        try:
            encoder = ctx.encoder(version)
            texts = [str(live[int(i)]) for i in encodable]
            encoded = np.concatenate([
                encoder.encode(texts[k : k + ENCODE_BATCH], ctx.settings.encode_batch_size)
                for k in range(0, len(texts), ENCODE_BATCH)
            ])  # fmt: skip
        except EncoderError:
            encodable = np.zeros(0, np.int64)
    lost = sorted(set(missing.tolist()) - set(encodable.tolist()))
    tmp = root.parent / f".{root.name}.rebuild-{uuid.uuid4().hex[:8]}"
    fresh = SpaceStore(tmp, version.dim, where)
    if len(ids):
        fresh.add(ids, vecs, srcs)
    if len(encodable):
        sources = np.array([content_hash(live[int(i)]) for i in encodable], np.uint64)
        fresh.add(encodable, encoded, sources)
    # the old generation indexes the old rows: until the fresh one is published, the
    # rebuilt space is searched exactly from the store
    (gallery_dir(ctx, gallery) / "indexes" / root.name / "CURRENT").unlink(missing_ok=True)
    for _ in range(3):  # a reader may re-create an empty space between the two renames
        if root.exists():
            root.rename(root.parent / f".{root.name}.damaged-{uuid.uuid4().hex[:8]}")
        try:
            tmp.rename(root)
            break
        except OSError:
            continue
    ctx.spaces.forget(root)
    for old in root.parent.glob(f".{root.name}.damaged-*"):
        shutil.rmtree(old, ignore_errors=True)
    return {
        "kept": int(len(ids)),
        "encoded": int(len(encodable)),
        "unrebuildable": len(lost),
        "unrebuildable_items": [names[i] for i in lost[:NAMED_AT_MOST]],
    }
