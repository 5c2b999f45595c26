"""Serving plans over a gallery mid-upgrade: the old space holds every item's v1 vector
(kept until the upgrade finishes), the new space holds the items backfilled so far.

Two-part plans search the new space for upgraded items and the old space for the rest
(upgraded ids excluded inside FAISS), then merge:
- `bridge`: the new query mapped into the old space by a query-side adapter;
- `mapped`: the new query on old vectors mapped into the new space (gallery-side adapter);
- `dual`: the old part searched exactly as before the upgrade, with the old query;
- `basis`: one unified space: new vectors scored as they are (the basis rotation keeps
  inner products), old ones zero-padded, i.e. scored against the basis head of the query.
`cascade`: the old index proposes its top-K (old query), the new index its top-K; every
candidate is scored in both spaces (a new vector missing from the store is encoded on
the fly from the stored payload, within a per-query budget, and written back: read-through
backfill), and the two rankings are fused.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from embcompat.adapters.base import Adapter
from embcompat.arrays import FloatArray, IdArray
from embcompat.errors import EmbcompatError, InvalidInput
from embcompat.index.faiss_index import SpaceSearcher
from embcompat.index.folded import FoldedSearcher
from embcompat.index.merge import Platt, fuse_z, rrf_rows, rrf_scores, zscore_rows
from embcompat.kinds import Merge, ServingPlan

PATHS = ("new", "bridge", "mapped", "old", "basis", "cascade")  # codes in Results.paths
_OLD_PATH = {"bridge": 1, "mapped": 2, "dual": 3, "basis": 4}


class ReadThrough(Protocol):
    def encode(self, ids: IdArray) -> tuple[IdArray, FloatArray]:
        """Encode these items' stored payloads with the new version and store them;
        returns the ids now stored and their vectors (a failure raises)."""
        ...


@dataclass
class MixedIndex:
    old: SpaceSearcher
    new: SpaceSearcher
    mapped: SpaceSearcher | FoldedSearcher | None = None  # folded: see index.folded
    pool: Executor | None = None  # searches the two spaces side by side when given
    allow: IdArray | None = None  # only these items (a filter's matches), sorted

    def upgraded(self) -> IdArray:
        """Sorted ids already in the new space (the same array until it changes)."""
        return self.new.store.snapshot().sorted_ids

    def budgets(self) -> tuple[float, float]:
        """(old side, new side) shares of the live items: how a mixed search splits the
        breadth of its graph searches between the two spaces."""
        n_new = len(self.new.store.snapshot())
        n_old = max(len(self.old.store.snapshot()) - n_new, 0)  # upgraded ones are excluded
        total = max(n_new + n_old, 1)
        return n_old / total, n_new / total


@dataclass
class Plan:
    name: ServingPlan
    merge: Merge = Merge.RRF
    bridge: Adapter | None = None  # query: new->old, for `bridge`
    basis_head: FloatArray | None = None  # (d_new, d_old), for `basis`
    calibration: dict[str, Platt] = field(default_factory=dict)  # path name -> Platt
    weight: float = 0.5  # cascade `learned`: weight of the new space
    cascade_k: int = 50
    encode_budget: int = 32  # per query, for read-through

    def __post_init__(self) -> None:
        if self.name not in set(ServingPlan):
            raise InvalidInput(
                f"unknown plan {self.name!r}", hint=f"one of {', '.join(ServingPlan)}"
            )
        if self.merge not in set(Merge):
            raise InvalidInput(f"unknown merge {self.merge!r}", hint=f"one of {', '.join(Merge)}")
        if self.name == "bridge" and self.bridge is None:
            raise InvalidInput("plan 'bridge' needs a query-side adapter")
        if self.name == "basis" and self.basis_head is None:
            raise InvalidInput("plan 'basis' needs a basis adapter")


@dataclass
class Results:
    """(nq, k) arrays, best first: ids (-1 = empty), fused scores, path codes (PATHS),
    both spaces' scores where known and whether the new vector was encoded on the fly."""

    ids: IdArray
    scores: FloatArray
    paths: npt.NDArray[np.int8]
    score_old: FloatArray
    score_new: FloatArray
    on_the_fly: npt.NDArray[np.bool_]
    encodes: npt.NDArray[np.int64]
    encode_seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)


def search(
    index: MixedIndex,
    plan: Plan,
    q_new: FloatArray,
    q_old: FloatArray | None,
    k: int = 10,
    read_through: ReadThrough | None = None,
) -> Results:
    """q_new: (nq, d_new) and, for `dual`/`cascade`, q_old: (nq, d_old) → Results."""
    if plan.name in ("dual", "cascade") and q_old is None:
        raise InvalidInput(f"plan {plan.name!r} needs the query encoded by the old version too")
    if plan.name == "cascade":
        return _cascade(index, plan, q_new, q_old, k, read_through)  # type: ignore[arg-type]
    return _two_part(index, plan, q_new, q_old, k)


def _merge_part(plan: Plan, path: str, scores: FloatArray) -> FloatArray:
    if plan.merge == "raw" or plan.name == "basis":
        return scores
    if plan.merge == "rrf":
        ranks = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
        return np.where(np.isfinite(scores), rrf_scores(ranks), -np.inf).astype(np.float32)
    if plan.merge == "calibrated":
        if path not in plan.calibration:
            raise InvalidInput(f"plan {plan.name!r} has no calibration for path {path!r}")
        return plan.calibration[path](scores)
    raise InvalidInput(f"merge {plan.merge!r} applies to plan 'cascade' only")


def _two_part(
    index: MixedIndex, plan: Plan, q_new: FloatArray, q_old: FloatArray | None, k: int
) -> Results:
    upgraded = index.upgraded()  # served from the new space, never the old
    old_side: SpaceSearcher | FoldedSearcher
    if plan.name == "bridge":
        old_side, q_side = index.old, plan.bridge.transform(q_new)  # type: ignore[union-attr]
    elif plan.name == "mapped":
        if index.mapped is None:
            raise InvalidInput("plan 'mapped' needs a mapped space (run the map job first)")
        old_side, q_side = index.mapped, q_new
    elif plan.name == "dual":
        old_side, q_side = index.old, q_old  # type: ignore[assignment]
    else:
        head = plan.basis_head if plan.basis_head is not None else np.eye(q_new.shape[1])
        old_side, q_side = index.old, (q_new @ head).astype(np.float32)
    b_old, b_new = index.budgets()
    (s_new, i_new), (s_old, i_old) = both(
        index.pool,
        lambda: index.new.search(q_new, k, budget=b_new, allow=index.allow),
        lambda: old_side.search(q_side, k, exclude=upgraded, budget=b_old, allow=index.allow),
    )
    old_path = "old" if plan.name == "dual" else plan.name
    f_new = _merge_part(plan, "new", s_new)
    f_old = _merge_part(plan, old_path, s_old)
    ids = np.concatenate([i_new, i_old], axis=1)
    fused = np.concatenate([f_new, f_old], axis=1)
    raw = np.concatenate([s_new, s_old], axis=1)
    paths = np.concatenate(
        [np.zeros_like(i_new, np.int8), np.full_like(i_old, _OLD_PATH[plan.name], np.int8)], axis=1
    )
    order = _dedup_topk(ids, fused, k)
    take = lambda a: np.take_along_axis(a, order, 1)  # noqa: E731
    raw_k, paths_k = take(raw), take(paths)
    nan = np.full(raw_k.shape, np.nan, np.float32)
    return Results(
        ids=take(ids),
        scores=take(fused),
        paths=paths_k,
        score_old=np.where(paths_k != 0, raw_k, nan),
        score_new=np.where(paths_k == 0, raw_k, nan),
        on_the_fly=np.zeros(raw_k.shape, bool),
        encodes=np.zeros(len(q_new), np.int64),
    )


T = TypeVar("T")
U = TypeVar("U")


def both(pool: Executor | None, first: Callable[[], T], second: Callable[[], U]) -> tuple[T, U]:
    """Run the two spaces' searches side by side: FAISS and BLAS release the GIL, so a
    mixed query costs about the slower of its two searches instead of their sum."""
    if pool is None:
        return first(), second()
    pending = pool.submit(second)
    return first(), pending.result()


def _dedup_topk(ids: IdArray, scores: FloatArray, k: int) -> IdArray:
    """Column order of the best k distinct ids per row (an item found in two spaces
    mid-move appears once, with its best score); empty slots point at -inf entries."""
    order = np.argsort(-np.where(ids < 0, -np.inf, scores), axis=1, kind="stable")
    ranked = np.take_along_axis(ids, order, 1)
    keep_first = np.argsort(later_repeats(ranked) | (ranked < 0), axis=1, kind="stable")
    return np.take_along_axis(order, keep_first[:, :k], 1)


def later_repeats(ids: IdArray) -> npt.NDArray[np.bool_]:
    """True where a row's id already stood in an earlier column of that row."""
    by_id = np.argsort(ids, axis=1, kind="stable")  # equal ids keep their column order
    sorted_ids = np.take_along_axis(ids, by_id, 1)
    repeat = np.zeros(ids.shape, bool)
    repeat[:, 1:] = sorted_ids[:, 1:] == sorted_ids[:, :-1]
    out = np.zeros(ids.shape, bool)
    np.put_along_axis(out, by_id, repeat, 1)
    return out


def _cascade(
    index: MixedIndex,
    plan: Plan,
    q_new: FloatArray,
    q_old: FloatArray,
    k: int,
    read_through: ReadThrough | None,
) -> Results:
    nq, kk = len(q_new), plan.cascade_k
    b_old, b_new = index.budgets()
    (s_old, i_old), (_, i_new) = both(
        index.pool,
        lambda: index.old.search(q_old, kk, budget=b_old, allow=index.allow),
        lambda: index.new.search(q_new, kk, budget=b_new, allow=index.allow),
    )
    cand = np.concatenate([i_old, i_new], axis=1)  # (nq, 2K), may repeat ids
    old_vecs, old_found = index.old.store.get(cand.ravel())
    sc_old = np.einsum("qcd,qd->qc", old_vecs.reshape(nq, 2 * kk, -1), q_old)
    sc_old[~old_found.reshape(nq, -1) | (cand < 0)] = np.nan
    new_vecs, new_found = index.new.store.get(cand.ravel())
    new_found = new_found.reshape(nq, -1) & (cand >= 0)
    on_the_fly = np.zeros(cand.shape, bool)
    warnings: list[str] = []
    encodes = np.zeros(nq, np.int64)
    t0 = time.perf_counter()
    if read_through is not None and plan.encode_budget > 0:
        wanted = _within_budget(cand, new_found, sc_old, plan.encode_budget)
        if wanted.any():
            try:
                got_ids, got_vecs = read_through.encode(np.unique(cand[wanted]))
                pos = {int(i): r for r, i in enumerate(got_ids)}
                for q, c in zip(*np.nonzero(wanted), strict=True):
                    r = pos.get(int(cand[q, c]))
                    if r is not None:
                        new_vecs[q * 2 * kk + c] = got_vecs[r]
                        new_found[q, c] = on_the_fly[q, c] = True
                encodes = on_the_fly.sum(1)
            except EmbcompatError as exc:
                warnings.append(f"new encoder unavailable, ranked by what is known: {exc.message}")
            except Exception as exc:  # an encoder failure must never fail the search
                warnings.append(f"new encoder failed, ranked by what is known: {exc!r}")
    seconds = time.perf_counter() - t0
    sc_new = np.einsum("qcd,qd->qc", new_vecs.reshape(nq, 2 * kk, -1), q_new)
    sc_new[~new_found] = np.nan
    # a candidate proposed by both indexes appears twice: keep its first column only
    dup = later_repeats(cand)
    sc_old[dup], sc_new[dup] = np.nan, np.nan
    alive = ~dup & (cand >= 0)
    if plan.merge == "rrf":
        # a side with no score (new vector not stored, beyond the budget) counts as if it
        # ranked the item where the other side does, so being unknown is never a penalty
        r_old, r_new = rrf_rows(sc_old), rrf_rows(sc_new)
        fused = np.where(np.isfinite(sc_old), r_old, r_new) + np.where(
            np.isfinite(sc_new), r_new, r_old
        )
    elif plan.merge == "learned":
        fused = fuse_z(zscore_rows(sc_old), zscore_rows(sc_new), plan.weight)
    else:
        raise InvalidInput(f"cascade fuses with 'rrf' or 'learned', not {plan.merge!r}")
    fused = np.where(alive, fused, -np.inf).astype(np.float32)
    order = np.argsort(-fused, axis=1, kind="stable")[:, :k]
    take = lambda a: np.take_along_axis(a, order, 1)  # noqa: E731
    ids = np.where(np.isfinite(take(fused)), take(cand), -1)
    return Results(
        ids=ids,
        scores=take(fused),
        paths=np.full(ids.shape, PATHS.index("cascade"), np.int8),
        score_old=take(sc_old).astype(np.float32),
        score_new=take(sc_new).astype(np.float32),
        on_the_fly=take(on_the_fly),
        encodes=encodes,
        encode_seconds=seconds,
        warnings=warnings,
    )


def _within_budget(
    cand: IdArray, found: npt.NDArray[np.bool_], sc_old: FloatArray, budget: int
) -> npt.NDArray[np.bool_]:
    """Per query, the `budget` best old-ranked candidates whose new vector is missing."""
    missing = ~found & (cand >= 0)
    key = np.where(missing, np.nan_to_num(sc_old, nan=-np.inf), -np.inf)
    wanted = np.zeros(cand.shape, bool)
    for r in range(len(cand)):
        seen: set[int] = set()
        for c in (c for c in np.argsort(-key[r], kind="stable") if missing[r, c]):
            if len(seen) == budget:
                break
            if int(cand[r, c]) not in seen:
                seen.add(int(cand[r, c]))
                wanted[r, c] = True
    return wanted
