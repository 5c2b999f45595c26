"""Adapters fitted and evaluated between two registered versions without an upgrade job
(`POST /adapters`): on pairs the caller sends (texts, or vectors of both versions) or on
a sample of a gallery's stored texts, logged to MLflow like an upgrade's."""

from __future__ import annotations

import hashlib
import uuid
from typing import Any

import numpy as np
from sqlalchemy import select

from embcompat.adapters.select import CANDIDATES
from embcompat.arrays import FloatArray, check_vectors
from embcompat.errors import InvalidInput, UpgradeRefused
from embcompat.registry import versions
from embcompat.registry.records import ModelVersionRecord
from embcompat.registry.schema import Item
from embcompat.service.context import Context
from embcompat.service.galleries import get_gallery_row
from embcompat.service.upgrade.fitting import MIN_SAMPLE, fit_and_log

MAX_PAIRS = 100_000


def fit_standalone(
    ctx: Context,
    model: str,
    old_version: str,
    new_version: str,
    *,
    kinds: tuple[str, ...],
    gallery: str | None = None,
    texts: list[str] | None = None,
    vectors: tuple[Any, Any] | None = None,
    sample: int = 2000,
) -> dict[str, Any]:
    """Fit the bridge (new→old, the best of `kinds`), the mapper (old→new) and, when the
    new space is at least as wide, the basis on pairs from exactly one source: `texts`
    (encoded by both versions), `vectors` (old, new: rows aligned) or `sample` items of
    `gallery` with stored text. Returns each adapter's id, MLflow URI and metrics."""
    unknown = [k for k in kinds if k not in CANDIDATES]
    if not kinds or unknown:
        raise InvalidInput(
            f"unknown adapter kind {unknown[0] if unknown else ''!r}",
            hint=f"auto or one of {', '.join(CANDIDATES)}",
            field="kind",
        )
    if not MIN_SAMPLE <= sample <= MAX_PAIRS:
        raise InvalidInput(f"sample must be {MIN_SAMPLE} to {MAX_PAIRS}", field="sample")
    with ctx.session() as s:
        old = versions.get_version(s, ctx.registry, model, old_version)
        new = versions.get_version(s, ctx.registry, model, new_version)
    if sum(x is not None for x in (gallery, texts, vectors)) != 1:
        raise InvalidInput("give exactly one of gallery, texts or vectors for the pairs")
    if vectors is not None:
        x_old = check_vectors(vectors[0], old.dim, f"pairs of {old.ref}")
        x_new = check_vectors(vectors[1], new.dim, f"pairs of {new.ref}")
        if len(x_old) != len(x_new):
            raise InvalidInput(f"{len(x_old)} old vectors for {len(x_new)} new ones")
    else:
        texts = texts if texts is not None else _gallery_texts(ctx, gallery or "", sample)
        x_old, x_new = _encode(ctx, old, texts), _encode(ctx, new, texts)
    if not MIN_SAMPLE <= len(x_old) <= MAX_PAIRS:
        raise InvalidInput(f"{len(x_old)} pairs: an adapter needs {MIN_SAMPLE} to {MAX_PAIRS}")
    digest = hashlib.sha256(x_old.tobytes() + x_new.tobytes()).hexdigest()[:16]
    folder = (
        ctx.data_dir / "adapters" / f"{model}-{old.version}-{new.version}-{uuid.uuid4().hex[:8]}"
    )
    folder.mkdir(parents=True)
    logged, selection = fit_and_log(ctx, folder, x_old, x_new, old, new, digest, kinds)
    return {"from": old.ref, "to": new.ref, "pairs": len(x_old), "pairs_hash": digest,
            "bridge_selection": selection, "adapters": logged}  # fmt: skip


def _encode(ctx: Context, version: ModelVersionRecord, texts: list[str]) -> FloatArray:
    if version.external:
        raise UpgradeRefused(
            f"{version.ref} is external: nothing here can encode the pairs' texts",
            hint="send the pairs as vectors of both versions",
        )
    return ctx.encoder(version).encode(texts, ctx.settings.encode_batch_size)


def _gallery_texts(ctx: Context, gallery: str, sample: int) -> list[str]:
    """Up to `sample` stored texts of the gallery, drawn at random (seeded by its size)."""
    with ctx.session() as s:
        g = get_gallery_row(s, gallery)
        ids = s.scalars(
            select(Item.id).where(
                Item.gallery_id == g.id, Item.payload.is_not(None), Item.payload != ""
            )
        ).all()
        n = len(ids)
        pick = np.sort(np.random.default_rng(n).choice(n, min(sample, n), replace=False))
        chosen = [ids[i] for i in pick]
        texts: list[str] = []
        for start in range(0, len(chosen), 10_000):
            part = chosen[start : start + 10_000]
            rows = s.execute(select(Item.payload).where(Item.id.in_(part)))
            texts += [t for (t,) in rows if t]
    return texts
