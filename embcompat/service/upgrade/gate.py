"""The gate: measure on the held-out pairs (and a labelled probe when given) and choose
the serving plan, or refuse the upgrade.

Label-free truth: the new model's own top-10 among the held-out items. The bridge is
refused when it recovers less of it than the old model does on its own (M(new,old)
below M(old,old)); a requested plan that needs a refused bridge falls back to `dual`."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from embcompat.adapters.metrics import neighbour_recall, search
from embcompat.arrays import FloatArray, IdArray
from embcompat.kinds import AdapterStatus, JobState, ServingPlan, UpgradePlan
from embcompat.registry.records import ModelVersionRecord
from embcompat.registry.schema import AdapterRow
from embcompat.service.context import Context
from embcompat.service.galleries.layout import gallery_row_by_id
from embcompat.service.upgrade.control import fail
from embcompat.service.upgrade.fitting import FIT_SHARE
from embcompat.service.upgrade.jobs import (
    job_adapter,
    job_row,
    job_versions,
    paired_vectors,
    serves_compatible,
)
from embcompat.service.upgrade.probe import measure as probe_measure
from embcompat.service.upgrade.states import transition


def proxy_bridge_check(bridge: Any, h_old: FloatArray, h_new: FloatArray) -> tuple[float, float]:
    """(M(old,old), M(new,old)) as label-free neighbour recall against the new model's
    own top-10 on held-out pairs h_old, h_new: (n, d_old), (n, d_new)."""
    truth = search(h_new, h_new, 11)[1][:, 1:]
    old_old = neighbour_recall(search(h_old, h_old, 11)[1][:, 1:], truth)
    new_old = neighbour_recall(search(bridge.transform(h_new), h_old, 11)[1][:, 1:], truth)
    return old_old, new_old


def choose_plan(
    requested: str, bridge_ok: bool, old: ModelVersionRecord, new: ModelVersionRecord
) -> tuple[ServingPlan, str]:
    """The plan to serve and why, from the request and what the gate measured."""
    both_encoders = not old.external and not new.external
    if requested == UpgradePlan.AUTO:
        if both_encoders:
            plan, reason = (
                ServingPlan.CASCADE,
                "both encoders are available: the cascade fuses them from day one",
            )
        else:
            plan = ServingPlan.BRIDGE if bridge_ok else ServingPlan.DUAL
            reason = "chosen by the gate's measurement"
    elif requested == UpgradePlan.BRIDGE and not bridge_ok:
        plan, reason = (
            ServingPlan.DUAL,
            "the bridge would search worse than staying on the old model",
        )
    elif requested == UpgradePlan.BACKFILL:
        plan, reason = ServingPlan.DUAL, "requested backfill: the old part searched as before"
    else:
        plan, reason = ServingPlan(requested), "requested"
    if plan in (ServingPlan.DUAL, ServingPlan.CASCADE) and old.external:
        plan, reason = ServingPlan.BRIDGE, f"{old.ref} is external: queries cannot be encoded by it"
    return plan, reason


def step_gate(ctx: Context, job_id: int) -> None:
    """Measure, then serve the chosen plan (or fail the job on a measured downgrade)."""
    with ctx.session() as s:
        job = job_row(s, job_id)
        if job.state != JobState.GATED:
            return
        requested = job.params["plan"]
    v = job_versions(ctx, job_id)
    if serves_compatible(ctx, job_id):
        reason = (
            f"{v.new.ref} was trained compatible with {v.old.ref} "
            f"(method {v.new.tags.get('method', '?')}): old vectors are served zero-padded, "
            "with no adapter and nothing re-embedded"
        )
        serve(ctx, job_id, ServingPlan.BASIS, {"plan": "basis", "reason": reason})
        return
    ids, x_old, x_new = paired_vectors(ctx, job_id)
    cut = int(FIT_SHARE * len(x_old))
    bridge = job_adapter(ctx, job_id, "bridge", v.new, v.old)
    old_old, new_old = proxy_bridge_check(bridge, x_old[cut:], x_new[cut:])
    bridge_ok = new_old >= old_old
    plan, reason = choose_plan(requested, bridge_ok, v.old, v.new)
    labelled = None
    if not v.old.external and not v.new.external:
        labelled = _measure_probe(ctx, job_id, v.old, v.new, ids, x_old, x_new)
    if labelled and labelled.get("downgrade"):
        fail(
            ctx,
            job_id,
            f"upgrade refused: a downgrade on the labelled probe (M(new,new) "
            f"{labelled['r10_new_new']:.3f} < M(old,old) {labelled['r10_old_old']:.3f})",
        )
        with ctx.session(write=True) as s:
            job = job_row(s, job_id)
            job.report = {
                **job.report,
                "gate": {"probe": labelled, "plan": None, "reason": "downgrade: not worth running"},
            }
        return
    if labelled and plan == ServingPlan.CASCADE and labelled.get("capped"):
        reason += (
            f"; the old model's recall@{labelled['cascade_k']} caps the cascade below "
            "v2 alone: backfill soon, items queries touch first (read-through)"
        )
    gate = {
        "proxy_r10_old_old": old_old,
        "proxy_r10_new_old": new_old,
        "bridge_accepted": bridge_ok,
        "plan": str(plan),
        "reason": reason,
        "held_out_pairs": len(x_old) - cut,
        **({"probe": labelled} if labelled else {}),
    }
    _record_bridge_verdict(ctx, v.old, v.new, bridge_ok, gate)
    serve(ctx, job_id, plan, gate)


def _record_bridge_verdict(
    ctx: Context,
    old: ModelVersionRecord,
    new: ModelVersionRecord,
    accepted: bool,
    gate: dict[str, Any],
) -> None:
    with ctx.session(write=True) as s:
        adapter = s.scalars(
            select(AdapterRow)
            .where(
                AdapterRow.from_version_id == new.id,
                AdapterRow.to_version_id == old.id,
                AdapterRow.direction == "query: new->old",
            )
            .order_by(AdapterRow.id.desc())
        ).first()
        if adapter is not None:
            adapter.status = AdapterStatus.ACCEPTED if accepted else AdapterStatus.REFUSED
            adapter.metrics = {**adapter.metrics, **gate}


def serve(ctx: Context, job_id: int, plan: ServingPlan, gate: dict[str, Any]) -> None:
    """Record the gate's verdict and start serving the mixed gallery with `plan`."""
    with ctx.session(write=True) as s:
        job = job_row(s, job_id, lock=True)
        job.report = {**job.report, "gate": gate}
        if job.state == JobState.GATED:
            job.plan = str(plan)
            gallery_row_by_id(s, job.gallery_id).plan = str(plan)
            transition(job, JobState.SERVING_BRIDGE)


def _measure_probe(
    ctx: Context,
    job_id: int,
    old: ModelVersionRecord,
    new: ModelVersionRecord,
    ids: IdArray,
    x_old: FloatArray,
    x_new: FloatArray,
) -> dict[str, Any] | None:
    with ctx.session() as s:
        job = job_row(s, job_id)
        probe, gallery_id, total = job.params.get("probe") or [], job.gallery_id, job.items_total
    if not probe or gallery_id is None:
        return None
    return probe_measure(ctx, gallery_id, probe, ids, x_old, x_new, old, new, total)
