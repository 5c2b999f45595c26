"""Search a gallery, whatever state its upgrade is in.

No upgrade: the serving version's space. During an upgrade (serving or backfilling): the
job's plan over the mixed index (old space + new space), with the cascade's read-through
backfill writing every candidate it encodes on the fly. Each hit names the version and the
path that produced it.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import numpy as np
from sqlalchemy import select

from embcompat.arrays import check_vectors
from embcompat.errors import CorruptArtifact, InvalidInput, ServiceUnavailable, UnknownSpace
from embcompat.index.plans import PATHS, MixedIndex, Plan
from embcompat.index.plans import search as plan_search
from embcompat.kinds import SERVING_STATES, Merge, ServingPlan
from embcompat.registry.jobs import active_upgrade, last_done_upgrade
from embcompat.registry.records import ModelVersionRecord
from embcompat.registry.schema import Item
from embcompat.service.context import Context
from embcompat.service.galleries import (
    Filters,
    allowed_by,
    encode_and_store,
    get_gallery_row,
    known_version,
    space_searcher,
)
from embcompat.service.upgrade.jobs import (
    JobVersions,
    job_adapter,
    job_row,
    load_platt,
    mapped_side,
)

log = logging.getLogger(__name__)


@dataclass
class Hit:
    item: str
    score: float
    version: str
    path: str
    score_old: float | None = None
    score_new: float | None = None
    encoded_on_the_fly: bool = False


@dataclass
class SearchResponse:
    gallery: str
    plan: str
    hits: list[list[Hit]]
    warnings: list[str] = field(default_factory=list)
    encodes: int = 0
    latency_ms: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class StoreReadThrough:
    """Read-through backfill for the cascade: encode candidates from stored payloads
    with the new version and store them once (`galleries.encode_and_store`)."""

    def __init__(self, ctx: Context, gallery: str, version: ModelVersionRecord) -> None:
        self.ctx, self.gallery, self.version = ctx, gallery, version

    def encode(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        encode_and_store(self.ctx, self.gallery, self.version, ids)
        store = space_searcher(self.ctx, self.gallery, self.version).store
        vecs, found = store.get(ids)
        return ids[found], vecs[found]


class QueuedReadThrough:
    """Asynchronous read-through: the candidates a search would encode are queued (the
    workers' queue, or this context's background thread) and the search answers with
    what is known now; later searches find them stored. Ids already queued by this
    context and not yet stored are not queued again."""

    def __init__(self, ctx: Context, gallery: str, version: ModelVersionRecord) -> None:
        self.ctx, self.gallery, self.version = ctx, gallery, version

    def encode(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        fresh = self._pending().claim(self.gallery, ids)
        if fresh:
            queue = self.ctx.read_through_queue or self._in_background
            try:
                queue(self.gallery, self.version.id, fresh)
            except Exception as exc:  # the next search queues them again
                self._pending().release(self.gallery, fresh)
                log.warning("asynchronous read-through not queued: %r", exc)
                raise ServiceUnavailable("the read-through queue is unavailable") from None
        return ids[:0], np.zeros((0, self.version.dim), np.float32)

    def _pending(self) -> _Pending:
        return self.ctx.cached("read-through", "pending", _Pending)

    def _in_background(self, gallery: str, version_id: int, ids: list[int]) -> None:
        def run() -> None:
            try:
                encode_and_store(self.ctx, gallery, self.version, np.array(ids, np.int64))
            except Exception:  # released below: the next search queues them again
                log.exception("asynchronous read-through of %d items failed", len(ids))
            finally:
                self._pending().release(gallery, ids)

        self.ctx.background.submit(run)


class _Pending:
    """Items queued by an asynchronous read-through and not yet stored, per gallery. A
    claim lapses after PENDING_S (a lost worker task), so an item is queued again."""

    def __init__(self) -> None:
        self._since: dict[tuple[str, int], float] = {}
        self._lock = threading.Lock()

    def claim(self, gallery: str, ids: np.ndarray) -> list[int]:
        """The ids not queued yet (or whose claim lapsed), now marked queued."""
        now = time.monotonic()
        with self._lock:
            fresh = [
                int(i) for i in ids
                if now - self._since.get((gallery, int(i)), -PENDING_S) >= PENDING_S
            ]  # fmt: skip
            self._since.update(((gallery, i), now) for i in fresh)
            if len(self._since) > 100_000:  # drop lapsed claims now and then
                self._since = {k: t for k, t in self._since.items() if now - t < PENDING_S}
        return fresh

    def release(self, gallery: str, ids: list[int]) -> None:
        with self._lock:
            for i in ids:
                self._since.pop((gallery, i), None)


PENDING_S = 60.0


def _queries(
    ctx: Context, version: ModelVersionRecord, texts: list[str] | None, vectors: Any
) -> np.ndarray:
    if texts is not None:
        return ctx.encoder(version).encode(texts)
    return check_vectors(vectors, version.dim, f"query vectors for {version.ref}")


def search(
    ctx: Context,
    gallery: str,
    texts: list[str] | None = None,
    vectors: Any = None,
    k: int = 10,
    old_vectors: Any = None,
    read_through: bool = True,
    filters: Filters | None = None,
) -> SearchResponse:
    """texts (nq) or vectors (nq, d of the version queries are encoded with) → hits.

    Mid-upgrade, vectors are in the new version's space; plans that also search with the
    old version (`dual`, `cascade`) take the old encoding as `old_vectors` or encode text.
    `filters` ({key: value or [values]} on item metadata, `id` on item ids) restrict the
    hits; k stays full while enough matching items exist."""
    args = (ctx, gallery, texts, vectors, k, old_vectors, read_through, filters)
    try:
        return _search(*args)
    except UpgradeEnded:  # the gallery serves otherwise now: search it as it is
        return _search(*args)


class UpgradeEnded(ServiceUnavailable):
    """The upgrade a search was serving with ended, and dropped its mapped space, after
    the search read the job's state (a second time in a row: the client retries)."""


def _mapped_space_gone(ctx: Context, gallery: str, job_id: int) -> UpgradeEnded:
    """What a search does when its job's mapped space is not on disk: search again if
    the job has ended since its state was read, fail loudly if the job still serves."""
    if _serves(ctx, job_id):
        raise CorruptArtifact(
            f"the mapped space of upgrade job {job_id} on gallery {gallery!r} is missing "
            "while the job serves it",
            hint="roll the job back (the old version serves alone) and upgrade again",
            job=job_id,
        )
    return UpgradeEnded(f"upgrade job {job_id} on gallery {gallery!r} ended during a search")


def _search(
    ctx: Context,
    gallery: str,
    texts: list[str] | None,
    vectors: Any,
    k: int,
    old_vectors: Any,
    read_through: bool,
    filters: Filters | None,
) -> SearchResponse:
    if (texts is None) == (vectors is None):
        raise InvalidInput("give either query texts or query vectors", field="query")
    if not 1 <= k <= 1000:
        raise InvalidInput(f"k must be between 1 and 1000, got {k}", field="k")
    t0 = time.perf_counter()
    allowed = allowed_by(ctx, gallery, filters)
    with ctx.session() as s:
        g = get_gallery_row(s, gallery)
        serving = known_version(ctx, s, g.serving_version_id)
        kind = g.index_kind
        job = active_upgrade(s, g.id)
        mixed_plan = job.plan if job is not None and job.state in SERVING_STATES else None
        old, target = serving, None
        if mixed_plan and job is not None:
            target = known_version(ctx, s, job.to_version_id)
        elif g.plan == ServingPlan.CASCADE:  # finished; the probe said both beat v2 alone
            job = last_done_upgrade(s, g.id)
            if job is not None:
                mixed_plan = ServingPlan.CASCADE
                old, target = known_version(ctx, s, job.from_version_id), serving
        job_id = job.id if job else None
        gate = dict((job.report or {}).get("gate", {})) if job else {}
    if mixed_plan is None or target is None:
        q = _queries(ctx, serving, texts, vectors)
        scores, ids = space_searcher(ctx, gallery, serving, kind).search(q, k, allow=allowed)
        hits = _hits(ctx, ids, scores, lambda r, c: (serving.version, "index", None, None, False))
        return SearchResponse(gallery, "single", hits, latency_ms=_ms(t0))
    needs_old = mixed_plan in (ServingPlan.DUAL, ServingPlan.CASCADE)
    if needs_old and texts is None and old_vectors is None:
        raise InvalidInput(
            f"plan {mixed_plan!r} searches with both versions: send text, or old_vectors too",
            field="old_vectors",
        )
    q_new = _queries(ctx, target, texts, vectors)
    q_old = _queries(ctx, old, texts, old_vectors) if needs_old else None
    plan = _plan(ctx, ServingPlan(mixed_plan), cast(int, job_id), old, target, gate)
    mapped = None
    if mixed_plan == ServingPlan.MAPPED:
        versions = JobVersions(old, target, gallery, kind)
        mapped = mapped_side(ctx, cast(int, job_id), versions)
        if mapped is None:
            raise _mapped_space_gone(ctx, gallery, cast(int, job_id))
    index = MixedIndex(
        space_searcher(ctx, gallery, old, kind),
        space_searcher(ctx, gallery, target, kind),
        mapped,
        pool=ctx.search_pool,
        allow=allowed,
    )
    cascade = mixed_plan == ServingPlan.CASCADE
    writer: StoreReadThrough | QueuedReadThrough | None = None
    if read_through and cascade:
        asynchronous = ctx.settings.cascade_read_through == "async"
        writer = (QueuedReadThrough if asynchronous else StoreReadThrough)(ctx, gallery, target)
    try:
        res = plan_search(index, plan, q_new, q_old, k, writer)
    except UnknownSpace:  # dropped between opening the mapped space and reading it
        if mapped is None:
            raise
        raise _mapped_space_gone(ctx, gallery, cast(int, job_id)) from None

    def describe(r: int, c: int) -> tuple[str, str, float | None, float | None, bool]:
        path = PATHS[res.paths[r, c]]
        version = target.version if path == "new" else old.version
        if path == "cascade":
            version = f"{old.version}+{target.version}"
        so, sn = res.score_old[r, c], res.score_new[r, c]
        return (version, path, None if np.isnan(so) else float(so),
                None if np.isnan(sn) else float(sn), bool(res.on_the_fly[r, c]))  # fmt: skip

    hits = _hits(ctx, res.ids, res.scores, describe)
    warnings = [gate["warning"], *res.warnings] if gate.get("warning") else res.warnings
    return SearchResponse(gallery, mixed_plan, hits, warnings, int(res.encodes.sum()), _ms(t0))


def _plan(
    ctx: Context,
    name: ServingPlan,
    job_id: int,
    old: ModelVersionRecord,
    new: ModelVersionRecord,
    gate: dict[str, Any],
) -> Plan:
    """The serving plan of a job, its adapters and calibration kept on the context."""
    labelled = gate.get("probe") or {}
    if name == ServingPlan.CASCADE:  # jobs gated before the cross-validation: learned
        chosen = labelled.get("merge", "learned" if "weight" in labelled else "rrf")
        merge = Merge.LEARNED if chosen == "learned" else Merge.RRF
    else:
        merge = Merge.CALIBRATED
    bridge = job_adapter(ctx, job_id, "bridge", new, old) if name == ServingPlan.BRIDGE else None
    head = None
    if name == ServingPlan.BASIS:
        head = job_adapter(ctx, job_id, "basis", new, old).head  # type: ignore[attr-defined]
    return Plan(
        name,
        merge,
        bridge=bridge,
        basis_head=head,
        calibration=load_platt(ctx, job_id),
        weight=float(labelled.get("weight", 0.5)),
        cascade_k=int(labelled.get("cascade_k", 50)),
        encode_budget=ctx.settings.cascade_encode_budget,
    )


def _serves(ctx: Context, job_id: int) -> bool:
    with ctx.session() as s:
        return job_row(s, job_id).state in SERVING_STATES


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1e3


def _hits(ctx: Context, ids: np.ndarray, scores: np.ndarray, describe: Any) -> list[list[Hit]]:
    wanted = sorted({int(i) for i in ids.ravel() if i >= 0})
    with ctx.session() as s:
        names = dict(s.execute(select(Item.id, Item.external_id).where(Item.id.in_(wanted))).all())
    out = []
    for r in range(len(ids)):
        row = []
        for c in range(ids.shape[1]):
            item = int(ids[r, c])
            if item < 0 or item not in names:
                continue
            version, path, so, sn, fly = describe(r, c)
            row.append(Hit(names[item], float(scores[r, c]), version, path, so, sn, fly))
        out.append(row)
    return out
