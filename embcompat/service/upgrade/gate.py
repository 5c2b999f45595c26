"""The gate: measure on the held-out pairs (and a labelled probe when given) and choose
the serving plan, or refuse the upgrade.

Label-free, the new model's own top-10 among the held-out items stands in for the
truth (M(new,old) against M(old,old)). It is recorded as advice, never as the deciding
test: a bridge wins it by construction, so bridge-type plans need an operator's
override (`choose_plan`). With a labelled probe every plan is measured on it (day one
and 100 %, a sign test against v1) and the no-regret plan with the highest lowest point
is served."""

from __future__ import annotations

from typing import Any

from embcompat.adapters.metrics import neighbour_recall, search
from embcompat.arrays import FloatArray, IdArray
from embcompat.kinds import AdapterStatus, JobState, ServingPlan, UpgradePlan
from embcompat.registry.records import ModelVersionRecord
from embcompat.registry.schema import AdapterRow
from embcompat.service.context import Context
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
from embcompat.service.upgrade.states import start_serving


def proxy_bridge_check(bridge: Any, h_old: FloatArray, h_new: FloatArray) -> tuple[float, float]:
    """(M(old,old), M(new,old)) as label-free neighbour recall against the new model's
    own top-10 on held-out pairs h_old, h_new: (n, d_old), (n, d_new)."""
    truth = search(h_new, h_new, 11)[1][:, 1:]
    old_old = neighbour_recall(search(h_old, h_old, 11)[1][:, 1:], truth)
    new_old = neighbour_recall(search(bridge.transform(h_new), h_old, 11)[1][:, 1:], truth)
    return old_old, new_old


BRIDGE_TYPES = {ServingPlan.BRIDGE, ServingPlan.MAPPED, ServingPlan.BASIS}
# A plan that answers old items through an adapter is judged on labels only when this
# many probe queries were measured: on a handful, "1 won, 0 lost" passes a sign test and
# proves nothing (a 240-item demo gallery picked `mapped` that way, then served 0.80
# against v1's 0.93).
MIN_BRIDGE_QUERIES = 100


def choose_plan(
    requested: str,
    bridge_ok: bool,
    old: ModelVersionRecord,
    new: ModelVersionRecord,
    override: bool = False,
    measured: dict[str, dict[str, Any]] | None = None,
) -> tuple[ServingPlan, str, str | None]:
    """The plan to serve, why, and the warning an override carries.

    With a labelled probe (`measured`: `probe.plan_points`), `auto` serves the plan
    whose lowest point (day one or 100 %) is highest among the no-regret ones, and a
    requested plan is served if it is no-regret; one the probe shows below v1 needs the
    override. Without one:

    A bridge-type plan (`bridge`, `mapped`, `basis` on a version not trained compatible)
    answers old items through an adapter. Without labels nothing shows that it searches
    no worse than the old model (the label-free proxy takes the new model's neighbours
    as the truth, which anything derived from the new model wins), so it is served only
    on the operator's explicit override, recorded with its warning. Otherwise: `cascade`
    when both encoders exist, `dual` when not (clients then send both encodings)."""
    both_encoders = not old.external and not new.external
    safe = ServingPlan.CASCADE if both_encoders else ServingPlan.DUAL
    if measured:
        return _choose_measured(requested, measured, safe, override, old, new, bridge_ok)
    warning = None
    if requested == UpgradePlan.AUTO:
        plan, reason = (
            safe,
            (
                "both encoders are available: the cascade fuses them from day one"
                if both_encoders
                else "an encoder is external: both spaces are searched with the vectors sent"
            ),
        )
    elif requested == UpgradePlan.BACKFILL:
        plan, reason = ServingPlan.DUAL, "requested backfill: the old part searched as before"
    elif ServingPlan(requested) in BRIDGE_TYPES and not override:
        plan, reason = (
            safe,
            (
                f"without labels nothing shows that {requested!r} searches no worse than "
                f"{old.ref}: serving {safe!r} (an operator can override, at that risk)"
            ),
        )
    elif ServingPlan(requested) in BRIDGE_TYPES:
        plan, reason = ServingPlan(requested), "requested, on the operator's override"
        warning = (
            f"{requested!r} is served on an operator's override: unlabelled, it may search "
            f"worse than {old.ref} alone"
            + ("" if bridge_ok else " (the label-free proxy also found it below)")
        )
    else:
        plan, reason = ServingPlan(requested), "requested"
    if plan in (ServingPlan.DUAL, ServingPlan.CASCADE) and old.external:
        plan = ServingPlan.DUAL
        reason += f"; {old.ref} is external: searches send old_vectors with the query"
    return plan, reason, warning


def _choose_measured(
    requested: str,
    measured: dict[str, dict[str, Any]],
    safe: ServingPlan,
    override: bool,
    old: ModelVersionRecord,
    new: ModelVersionRecord,
    bridge_ok: bool,
) -> tuple[ServingPlan, str, str | None]:
    def points(plan: str) -> str:
        m = measured[plan]
        return (
            f"R@10 {m['r10_day_one']:.3f} on day one, {m['r10_final']:.3f} at 100 %; "
            f"{m['queries_won']} probe queries won and {m['queries_lost']} lost against "
            f"{old.ref}"
        )

    measured = {
        p: m for p, m in measured.items()
        if p not in BRIDGE_TYPES or m.get("queries", 0) >= MIN_BRIDGE_QUERIES
    }  # fmt: skip
    if requested == UpgradePlan.AUTO:
        fine = [p for p, m in measured.items() if m["no_regret"]]
        if not fine:
            return safe, f"no plan is no-regret on the labelled probe: serving {safe!r}", None
        best = max(fine, key=lambda p: (measured[p]["lowest"], p == safe))
        return (
            ServingPlan(best),
            f"highest lowest point among the no-regret plans on the labelled probe: "
            f"{best!r} ({points(best)})",
            None,
        )
    if requested == UpgradePlan.BACKFILL:
        return ServingPlan.DUAL, "requested backfill: the old part searched as before", None
    if requested not in measured:
        return choose_plan(requested, bridge_ok, old, new, override)  # unlabelled
    if measured[requested]["no_regret"]:
        return (
            ServingPlan(requested),
            f"requested; no-regret on the labelled probe ({points(requested)})",
            None,
        )
    if override:
        warning = (
            f"{requested!r} is served on an operator's override although the labelled probe "
            f"shows it below {old.ref} on day one ({points(requested)})"
        )
        return ServingPlan(requested), "requested, on the operator's override", warning
    return (
        safe,
        f"the labelled probe shows {requested!r} below {old.ref} on day one "
        f"({points(requested)}): serving {safe!r}",
        None,
    )


def step_gate(ctx: Context, job_id: int) -> None:
    """Measure, then serve the chosen plan (or fail the job on a measured downgrade).
    Skipped once the plan is chosen (a mapped plan's job stays gated while it maps)."""
    with ctx.session() as s:
        job = job_row(s, job_id)
        if job.state != JobState.GATED or job.plan is not None:
            return
        requested = job.params["plan"]
        override = bool(job.params.get("override", False))
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
    labelled = None
    if not v.old.external and not v.new.external:
        adapters = {"bridge": bridge, "mapper": job_adapter(ctx, job_id, "mapper", v.old, v.new)}
        labelled = _measure_probe(ctx, job_id, v.old, v.new, ids, x_old, x_new, adapters)
    measured = (labelled or {}).get("plans")
    plan, reason, warning = choose_plan(requested, bridge_ok, v.old, v.new, override, measured)
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
        **({"override": True, "warning": warning} if warning else {}),
    }
    _record_bridge_verdict(ctx, job_id, bridge_ok, gate)
    serve(ctx, job_id, plan, gate)


def _record_bridge_verdict(ctx: Context, job_id: int, accepted: bool, gate: dict[str, Any]) -> None:
    """The verdict on the job's own bridge (its row id is in the job's report), never on
    another adapter between the same versions (`POST /adapters` fits those too)."""
    with ctx.session(write=True) as s:
        report = job_row(s, job_id).report or {}
        bridge_id = (report.get("adapters") or {}).get("bridge", {}).get("id")
        adapter = s.get(AdapterRow, bridge_id) if bridge_id is not None else None
        if adapter is not None:
            adapter.status = AdapterStatus.ACCEPTED if accepted else AdapterStatus.REFUSED
            adapter.metrics = {**adapter.metrics, **gate}


def serve(ctx: Context, job_id: int, plan: ServingPlan, gate: dict[str, Any]) -> None:
    """Record the gate's verdict and start serving the mixed gallery with `plan`. A
    `mapped` plan waits in `gated` until its map step has mapped the whole gallery
    (`backfill.publish_mapped`): its space holds only the chunks mapped so far before
    that, and an old item missing from it would be missing from every result."""
    with ctx.session(write=True) as s:
        job = job_row(s, job_id, lock=True)
        job.report = {**job.report, "gate": gate}
        if job.state == JobState.GATED:
            job.plan = str(plan)
            if plan != ServingPlan.MAPPED:
                start_serving(s, job)


def _measure_probe(
    ctx: Context,
    job_id: int,
    old: ModelVersionRecord,
    new: ModelVersionRecord,
    ids: IdArray,
    x_old: FloatArray,
    x_new: FloatArray,
    adapters: dict[str, Any],
) -> dict[str, Any] | None:
    with ctx.session() as s:
        job = job_row(s, job_id)
        probe, gallery_id, total = job.params.get("probe") or [], job.gallery_id, job.items_total
    if not probe or gallery_id is None:
        return None
    return probe_measure(ctx, gallery_id, probe, ids, x_old, x_new, old, new, total, adapters)
