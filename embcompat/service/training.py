"""Compatible training as a service operation (`embcompat train-compatible`, POST
/training): fine-tune a sentence-transformer into a version compatible with a registered
v1 (`training.text`) and register it with parent v1 and `compatible_with=v1`, so an
upgrade of a gallery served by v1 to it serves `basis` from the first query: text
queries encoded by v2, the stored vectors zero-padded, nothing paired or re-embedded.

Training pairs come either as (query text, relevant item text) rows, whose item texts
v1's encoder turns into the fixed targets once, or from a gallery served by v1: its
stored labelled probe paired with the relevant items' stored texts, whose targets are
the gallery's own stored v1 vectors (v1 never runs). A run is a `training_runs` row
(state, steps done of total, result); it checkpoints every epoch under the data dir,
so a run that stopped (a worker lost, a restart) resumes where it was.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select

from embcompat.errors import (
    DuplicateVersion,
    EmbcompatError,
    EncoderError,
    InvalidInput,
    UnknownTrainingRun,
)
from embcompat.files import atomic_write, atomic_write_npy
from embcompat.kinds import SourceKind
from embcompat.registry import versions
from embcompat.registry.db import row_lock
from embcompat.registry.encoders import SentenceTransformerEncoder
from embcompat.registry.records import ModelVersionRecord
from embcompat.registry.schema import Item, ModelVersion, TrainingRun
from embcompat.registry.shipped import MINILM_L6, MPNET, shipped_model_path
from embcompat.service.context import Context
from embcompat.service.galleries import get_gallery, get_probe, space_store, version_record
from embcompat.service.galleries.layout import SQL_CHUNK
from embcompat.training.text import (
    TextPairs,
    TextTrainConfig,
    pairs_from_texts,
    save_model,
    train_compatible,
)

MAX_PAIRS = 500_000
ENCODE_BATCH = 10_000  # v1 documents encoded between two heartbeats
BASES = (MINILM_L6, MPNET)  # shipped sentence-transformers a v2 can start from
TRAIN_PARAMS = ("method", "extra_dims", "weights", "epochs", "batch_size", "seed")

log = logging.getLogger(__name__)


def _split_ref(ref: str, field: str) -> tuple[str, str]:
    model, sep, version = ref.partition(":")
    if not sep or not model or not version:
        raise InvalidInput(f"{field} must be MODEL:VERSION, got {ref!r}", field=field)
    return model, version


def _run_dir(ctx: Context, run_id: int) -> Path:
    return ctx.data_dir / "training" / str(run_id)


def request_training(
    ctx: Context,
    *,
    old: str,
    version: str,
    base: str = MINILM_L6,
    pairs: list[tuple[str, str]] | None = None,
    gallery: str | None = None,
    method: str = "bt2",
    extra_dims: int = 0,
    weights: dict[str, float] | None = None,
    epochs: int = 1,
    batch_size: int = 64,
    seed: int = 0,
) -> int:
    """Validate a request and record it as a pending run; returns the run id. `old` is
    MODEL:VERSION (the new version is registered under the same model), `base` a
    shipped model or MODEL:VERSION of a registered sentence-transformer; `weights`
    override the method's loss weights term by term (bct with {"new": 2} kept new/new
    at 0.98 of an independent fine-tune on the WordNet protocol)."""
    config = TextTrainConfig(
        method=method, extra_dims=extra_dims, weights=dict(weights or {}), epochs=epochs,
        batch_size=batch_size, seed=seed,
    )  # fmt: skip
    config.check()
    if method == "independent":
        raise InvalidInput(
            "method 'independent' trains no compatibility: register such a model directly",
            field="method",
        )
    if not versions.NAME.fullmatch(version):
        raise InvalidInput(
            f"version name {version!r} is not allowed",
            hint="letters, digits, '.', '_' and '-', starting with a letter or digit",
            field="version",
        )
    if (pairs is None) == (gallery is None):
        raise InvalidInput("give training pairs or a gallery (its labelled probe), not both")
    if pairs is not None:
        if len(pairs) > MAX_PAIRS:
            raise InvalidInput(f"at most {MAX_PAIRS} training pairs, got {len(pairs)}")
        queries, _, _ = pairs_from_texts(pairs)
        if len(queries) < 2 * batch_size:
            raise InvalidInput(
                f"{len(queries)} training pairs are too few for batches of {batch_size}",
                field="pairs",
            )
    model, old_version = _split_ref(old, "old")
    if gallery is not None:
        g = get_gallery(ctx, gallery)
        if (g.model, g.serving_version) != (model, old_version):
            raise InvalidInput(
                f"gallery {gallery!r} is served by {g.model}:{g.serving_version}, not {old}",
                field="gallery",
            )
        probe = get_probe(ctx, gallery)
        if not probe:
            raise InvalidInput(
                f"gallery {gallery!r} stores no labelled probe",
                hint="PUT /galleries/{name}/probe, or give training pairs",
                field="gallery",
            )
        n_pairs = sum(len(q.get("relevant", [])) for q in probe)  # an upper bound
        if n_pairs < 2 * batch_size:
            raise InvalidInput(
                f"gallery {gallery!r}'s probe holds {n_pairs} (query, relevant item) pairs, "
                f"too few for batches of {batch_size}",
                field="gallery",
            )
    blob = json.dumps(pairs).encode() if pairs is not None else None
    with ctx.session(write=True) as s:
        old_row = versions.get_version_row(s, model, old_version)
        if any(v.version == version for v in old_row.model.versions):
            raise DuplicateVersion(f"model {model!r} already has a version {version!r}")
        if base not in BASES:  # refused now, not after the run has waited for a worker
            versions.get_version_row(s, *_split_ref(base, "base"))
        run = TrainingRun(
            old_version_id=old_row.id,
            version=version,
            state="pending",
            params={
                "base": base,
                "gallery": gallery,
                **{k: getattr(config, k) for k in TRAIN_PARAMS},
            },
            result={},
        )
        s.add(run)
        s.flush()
        run_id = run.id
        if blob is not None:  # before the commit: no run is ever left without its pairs
            atomic_write(_run_dir(ctx, run_id) / "pairs.json", blob)
    return run_id


def run_training(ctx: Context, run_id: int, progress: bool = False) -> dict[str, Any]:
    """Train, save and register (idempotent: a done run returns its result; a stopped
    one resumes from its last checkpoint; one another live process holds is left to it
    and returned as `running`). Returns the run as `get_training` does."""
    lease = ctx.settings.training_lease_s
    with ctx.session(write=True) as s:
        run = s.scalars(row_lock(select(TrainingRun).where(TrainingRun.id == run_id), s)).first()
        if run is None:
            raise UnknownTrainingRun(f"no training run {run_id}")
        if run.state == "done" or (run.state == "running" and not _lapsed(run, lease)):
            return _as_dict(run, lease)  # done, or held by a live process (a redelivered task)
        run.state, run.error, run.finished_at = "running", None, None
        run.heartbeat_at = datetime.now(UTC)
        old = version_record(ctx, s, run.old_version_id)
        params = dict(run.params)
        target = run.version
    try:
        result = _train_and_register(ctx, run_id, old, target, params, progress)
    except Exception as exc:
        log.exception("training run %d failed", run_id)
        with ctx.session(write=True) as s:
            run = _row(s, run_id)
            if run.state != "done":  # a redelivered copy of the run finished it meanwhile
                run.state, run.finished_at = "failed", datetime.now(UTC)
                run.error = _error_text(exc)
        raise
    with ctx.session(write=True) as s:
        run = _row(s, run_id)
        run.state, run.result, run.finished_at = "done", result, datetime.now(UTC)
        out = _as_dict(run, ctx.settings.training_lease_s)
    # epoch checkpoints hold the model and its optimiser state, several times the
    # model's size; the registered version is in MLflow now and nothing resumes a done run
    shutil.rmtree(_run_dir(ctx, run_id) / "checkpoints", ignore_errors=True)
    return out


def _lapsed(run: TrainingRun, lease_s: int, now: datetime | None = None) -> bool:
    """No sign of life for `lease_s`: the process holding the run is gone."""
    beat = run.heartbeat_at or run.created_at
    if beat.tzinfo is None:  # SQLite hands datetimes back naive (they are UTC)
        beat = beat.replace(tzinfo=UTC)
    return (now or datetime.now(UTC)) - beat > timedelta(seconds=lease_s)


def heartbeat(ctx: Context, run_id: int, steps: tuple[int, int] | None = None) -> None:
    """Renew the run's lease (and record steps done of total): long phases call it, so
    the beat never hands a live run to a second worker."""
    with ctx.session(write=True) as s:
        run = _row(s, run_id)
        run.heartbeat_at = datetime.now(UTC)
        if steps is not None:
            run.steps_done, run.steps_total = steps


def lapsed_runs(ctx: Context) -> list[int]:
    """Runs to hand to the workers again: pending or running with no sign of life for the
    lease (a lost dispatch, a killed worker, a task the broker gave up on). Their lease
    is renewed here, so a run is re-sent at most once per lease."""
    with ctx.session(write=True) as s:
        runs = s.scalars(
            row_lock(select(TrainingRun).where(TrainingRun.state.in_(("pending", "running"))), s)
        ).all()
        now = datetime.now(UTC)
        out = []
        for run in runs:
            if _lapsed(run, ctx.settings.training_lease_s, now):
                run.heartbeat_at = now
                out.append(run.id)
        return out


def _error_text(exc: Exception) -> str:
    """What a run's readers see: our errors' own messages, written for them; for any
    other error only its type, since its text may name server paths or SQL (the full
    error is in the worker's log)."""
    if isinstance(exc, EmbcompatError):
        return f"{exc.code}: {exc.message}"
    return f"internal_error: {type(exc).__name__} (see the worker's log)"


def _train_and_register(
    ctx: Context,
    run_id: int,
    old: ModelVersionRecord,
    target: str,
    params: dict[str, Any],
    progress: bool,
) -> dict[str, Any]:
    existing = _registered_by(ctx, old.model, target, run_id)
    if existing is not None:  # registered before a crash, not yet marked done
        return existing
    pairs = (
        _gallery_pairs(ctx, params["gallery"], old)
        if params.get("gallery")
        else _file_pairs(ctx, run_id, old)
    )
    config = TextTrainConfig(
        **{k: params[k] for k in TRAIN_PARAMS if k in params},
        checkpoint_dir=_run_dir(ctx, run_id) / "checkpoints",
        progress=progress,
    )
    res = train_compatible(
        _base_model(ctx, params["base"]), pairs, config, callbacks=[_progress(ctx, run_id)]
    )
    folder = ctx.models_dir / "trained" / f"{old.model}-{target}-run{run_id}"
    save_model(res.model, folder)
    tags = {
        "compatible_with": old.ref,
        "method": res.method,
        "extra_dims": str(res.extra_dims),
        "base": params["base"],
        "training_run": str(run_id),
        "trained_pairs": str(len(pairs.queries)),
    }
    try:
        with ctx.session(write=True) as s:
            rec = versions.register_version(
                s, ctx.registry, model=old.model, version=target, dim=res.dim,
                source=SourceKind.DIR, location=str(folder), parent=old.version,
                models_dir=ctx.models_dir, policy=ctx.model_policy, tags=tags,
            )  # fmt: skip
    except DuplicateVersion:
        # a redelivered copy of this run (the broker's visibility timeout) registered
        # it first: the run is done, not failed; any other owner's version is refused
        existing = _registered_by(ctx, old.model, target, run_id)
        if existing is None:
            raise
        return existing
    shutil.rmtree(folder, ignore_errors=True)  # MLflow keeps the registered copy
    return {
        "registered": rec.ref,
        "dim": res.dim,
        "train_s": round(res.train_s, 1),
        "pairs": len(pairs.queries),
        "documents": len(pairs.documents),
        "heldout": res.history,
        "resumed_from": res.resumed_from,
    }


def _registered_by(ctx: Context, model: str, version: str, run_id: int) -> dict[str, Any] | None:
    with ctx.session() as s:
        rows = s.scalars(select(ModelVersion).where(ModelVersion.version == version)).all()
        for row in rows:
            if row.model.name == model:
                if (row.tags or {}).get("training_run") != str(run_id):
                    raise DuplicateVersion(f"model {model!r} already has a version {version!r}")
                return {"registered": f"{model}:{version}", "dim": row.dim, "resumed": True}
    return None


def _file_pairs(ctx: Context, run_id: int, old: ModelVersionRecord) -> TextPairs:
    """The request's pairs; v1's vectors of their documents are encoded once and kept
    in the run's folder, so a resumed run does not encode them again."""
    rows = json.loads((_run_dir(ctx, run_id) / "pairs.json").read_text())
    queries, documents, doc_of = pairs_from_texts([tuple(r) for r in rows])
    cached = _run_dir(ctx, run_id) / "v1-documents.npy"
    if cached.exists():
        try:
            vectors = np.load(cached)
            if vectors.shape == (len(documents), old.dim) and np.isfinite(vectors).all():
                return TextPairs(queries, documents, doc_of, vectors)
        except (OSError, ValueError):
            pass  # damaged: encoded again below
    encoder = ctx.encoder(old)  # EncoderError for an external v1: send a gallery instead
    parts = []
    for start in range(0, len(documents), ENCODE_BATCH):  # minutes for large sets: keep the lease
        parts.append(
            np.asarray(encoder.encode(documents[start : start + ENCODE_BATCH]), np.float32)
        )
        heartbeat(ctx, run_id)
    vectors = np.concatenate(parts)
    atomic_write_npy(cached, vectors)
    return TextPairs(queries, documents, doc_of, vectors)


def _gallery_pairs(ctx: Context, gallery: str, old: ModelVersionRecord) -> TextPairs:
    """The probe's queries with each relevant item's stored text; targets are the
    gallery's stored v1 vectors of those items."""
    probe = get_probe(ctx, gallery) or []
    wanted = sorted({str(r) for q in probe for r in q.get("relevant", [])})
    g = get_gallery(ctx, gallery)
    found: dict[str, tuple[int, str]] = {}
    with ctx.session() as s:
        for start in range(0, len(wanted), SQL_CHUNK):
            part = wanted[start : start + SQL_CHUNK]
            query = select(Item.external_id, Item.id, Item.payload).where(
                Item.gallery_id == g.id, Item.external_id.in_(part)
            )
            found.update({ext: (i, text) for ext, i, text in s.execute(query) if text})
    rows = [(q["text"], str(r)) for q in probe for r in q.get("relevant", []) if str(r) in found]
    if not rows:
        raise InvalidInput(
            f"no probe query of gallery {gallery!r} has a relevant item with stored text",
            field="gallery",
        )
    ext_ids = sorted({r for _, r in rows})
    vectors, held = space_store(ctx, gallery, old).get(
        np.array([found[e][0] for e in ext_ids], np.int64)
    )
    keep = {e for e, h in zip(ext_ids, held, strict=True) if h}
    rows = [(q, found[e][1]) for q, e in rows if e in keep]
    queries, documents, doc_of = pairs_from_texts(rows)
    by_text = {found[e][1]: v for e, v, h in zip(ext_ids, vectors, held, strict=True) if h}
    return TextPairs(queries, documents, doc_of, np.stack([by_text[d] for d in documents]))


def _base_model(ctx: Context, base: str) -> Any:
    from sentence_transformers import SentenceTransformer

    if base in BASES:
        return SentenceTransformer(
            str(shipped_model_path(base, ctx.models_dir)), device="cpu", trust_remote_code=False
        )
    model, version = _split_ref(base, "base")
    with ctx.session() as s:
        rec = versions.get_version(s, ctx.registry, model, version)
    encoder = ctx.encoder(rec)
    if not isinstance(encoder, SentenceTransformerEncoder):
        raise EncoderError(
            f"{base} is not a sentence-transformer: compatible training fine-tunes one",
            field="base",
        )
    return encoder.model


def _progress(ctx: Context, run_id: int) -> Any:
    """A trainer callback that writes steps done of total to the run, at most every 2 s,
    renewing its lease."""
    from transformers import TrainerCallback

    last = [0.0]

    class Progress(TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if time.monotonic() - last[0] >= 2 or state.global_step == state.max_steps:
                last[0] = time.monotonic()
                heartbeat(ctx, run_id, (int(state.global_step), int(state.max_steps)))

        def on_evaluate(self, *args: Any, **kwargs: Any) -> None:
            heartbeat(ctx, run_id)

    return Progress()


def _row(s: Any, run_id: int) -> TrainingRun:
    run = s.get(TrainingRun, run_id)
    if run is None:
        raise UnknownTrainingRun(f"no training run {run_id}")
    return run


def _as_dict(run: TrainingRun, lease_s: int) -> dict[str, Any]:
    return {
        "id": run.id,
        "state": run.state,
        "version": run.version,
        "params": run.params,
        "progress": {"steps_done": run.steps_done, "steps_total": run.steps_total},
        "result": run.result,
        "error": run.error,
        "created_at": run.created_at.isoformat(),
        "heartbeat_at": run.heartbeat_at.isoformat() if run.heartbeat_at else None,
        "lapsed": run.state in ("pending", "running") and _lapsed(run, lease_s),
        "finished_at": run.finished_at.isoformat() if run.finished_at else None,
    }


def get_training(ctx: Context, run_id: int) -> dict[str, Any]:
    """The run as a plain record: state, progress, result, error (never the ORM row)."""
    with ctx.session() as s:
        return _as_dict(_row(s, run_id), ctx.settings.training_lease_s)
