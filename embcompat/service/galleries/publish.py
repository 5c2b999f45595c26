"""Publishing a gallery's index generations, and what a gallery holds."""

from __future__ import annotations

from typing import Any

import numpy as np
from sqlalchemy import func, select

from embcompat.index.binary import binarizer_metrics
from embcompat.index.faiss_index import IndexGenerations
from embcompat.registry.adapter_log import log_binarizer
from embcompat.registry.records import ModelVersionRecord
from embcompat.registry.schema import Item, ModelVersion
from embcompat.service.context import Context
from embcompat.service.galleries.layout import (
    gallery_dir,
    get_gallery_row,
    space_searcher,
    version_record,
)


def publish(ctx: Context, gallery: str) -> dict[str, int]:
    """Build and publish a new index generation for every version space of the gallery
    (a mapped space is searched from the store until its job finishes)."""
    out = {}
    with ctx.session() as s:
        kind = get_gallery_row(s, gallery).index_kind
    for space in sorted((gallery_dir(ctx, gallery) / "vectors").glob("v*")):
        if not space.name[1:].isdigit():
            continue
        with ctx.session() as s:
            rec = version_record(ctx, s, int(space.name[1:]))
        searcher = space_searcher(ctx, gallery, rec, kind)
        gens = searcher.generations
        out[space.name] = gens.publish(searcher.store)
        if gens.fitted_binarizer is not None:
            _register_binarizer(ctx, gens, rec, searcher.store.snapshot().vectors)
    return out


def _register_binarizer(
    ctx: Context, gens: IndexGenerations, version: ModelVersionRecord, vectors: np.ndarray
) -> None:
    """A binary index fitted its binarizer: register it with what it keeps of the
    space's own float neighbours."""
    binarizer = gens.fitted_binarizer
    if binarizer is None:
        return
    metrics = binarizer_metrics(binarizer, np.asarray(vectors))
    with ctx.session() as s:
        log_binarizer(s, ctx.registry, gens.root / "binarizer", binarizer, version, metrics)


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
            "vectors": len(ctx.spaces.open(space)),
            "generation": gens.current_number(),
        }
    return {
        "gallery": gallery,
        "items": total,
        "items_per_version": per_version,
        "spaces": spaces,
        "bytes_on_disk": size,
    }
