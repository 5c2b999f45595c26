"""The training step: fit the adapters on 80 % of the paired sample, measure each one's
upgrade curve on the held-out 20 %, save them to the job folder and register them."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from embcompat.adapters import BasisAdapter
from embcompat.adapters.base import Adapter
from embcompat.adapters.io import save_adapter
from embcompat.adapters.select import CANDIDATES, select_adapter
from embcompat.arrays import FloatArray
from embcompat.files import atomic_write
from embcompat.index.curve import curve_summary, fit_calibration, plot_curves, proxy_curve
from embcompat.index.merge import Platt
from embcompat.kinds import JobState, ServingPlan
from embcompat.registry.adapter_log import log_adapter
from embcompat.registry.records import ModelVersionRecord
from embcompat.service.context import Context
from embcompat.service.upgrade.jobs import (
    job_dir,
    job_row,
    job_versions,
    paired_vectors,
    serves_compatible,
)
from embcompat.service.upgrade.states import transition

FIT_SHARE = 0.8  # of the paired sample; the rest is held out for the curves and the gate
# The fewest pairs fitting works with: each adapter needs MIN_PAIRS to fit, the selection
# holds out 11 of the fitting share to compare them, the gate measures the rest.
MIN_SAMPLE = 40


@dataclass(frozen=True)
class Fitted:
    """One fitted adapter: its folder name, the plan it serves, its source and target."""

    name: str
    plan: ServingPlan
    adapter: Adapter
    source: ModelVersionRecord
    target: ModelVersionRecord
    metrics: dict[str, float]


def fit_adapters(
    x_old: FloatArray,
    x_new: FloatArray,
    old: ModelVersionRecord,
    new: ModelVersionRecord,
    bridge_kinds: tuple[str, ...] = tuple(CANDIDATES),
) -> tuple[list[Fitted], dict[str, Platt], dict[str, Any]]:
    """Fit the query-side bridge (the best of `bridge_kinds`) and the gallery-side mapper
    (auto selection), the basis (when the new space is at least as wide) and the score
    calibration; returns them with the bridge's selection report."""
    bridge = select_adapter(
        x_new, x_old, "query: new->old", bridge_kinds,
        fit_kwargs={"residual_mlp": {"max_steps": 200}},
    )  # fmt: skip
    mapper = select_adapter(x_old, x_new, "gallery: old->new", kinds=("procrustes", "affine"))
    calibration = fit_calibration(x_old, x_new, bridge.adapter, mapper.adapter, n_queries=500)
    fitted = [
        Fitted("bridge", ServingPlan.BRIDGE, bridge.adapter, new, old,
               {f"proxy_r10_{k}": v for k, v in bridge.scores.items()}),
        Fitted("mapper", ServingPlan.MAPPED, mapper.adapter, old, new,
               {f"proxy_r10_{k}": v for k, v in mapper.scores.items()}),
    ]  # fmt: skip
    if new.dim >= old.dim:
        basis = BasisAdapter.fit(x_new, x_old)
        fitted.append(Fitted("basis", ServingPlan.BASIS, basis, new, old, {}))
    return fitted, calibration, {"kind": bridge.kind, "scores": bridge.scores}


def curve_metrics(
    fitted: Fitted,
    h_old: FloatArray,
    h_new: FloatArray,
    calibration: dict[str, Platt],
    plot: Path,
) -> dict[str, float]:
    """The adapter's label-free upgrade curve on held-out pairs: plotted, summarised."""
    curve = proxy_curve(h_old, h_new, fitted.plan, fitted.adapter, calibration)
    plot_curves(curve, plot)
    (summary,) = curve_summary([{**r, "pair": ""} for r in curve])
    return {"curve_auc": summary["auc"], "curve_min_r10": summary["min_r10"]}


def fit_and_log(
    ctx: Context,
    folder: Path,
    x_old: FloatArray,
    x_new: FloatArray,
    old: ModelVersionRecord,
    new: ModelVersionRecord,
    pairs_hash: str,
    bridge_kinds: tuple[str, ...] = tuple(CANDIDATES),
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Fit the adapters on FIT_SHARE of the pairs, measure each one's label-free curve on
    the rest, save them (and the calibration) in `folder`, log each to MLflow with its
    metrics and plot and add its row; returns {name: {id, kind, uri, metrics}} and the
    bridge's selection report. An upgrade's training step and `POST /adapters` both."""
    cut = int(FIT_SHARE * len(x_old))
    fitted, calibration, selection = fit_adapters(x_old[:cut], x_new[:cut], old, new, bridge_kinds)
    atomic_write(
        folder / "calibration.json",
        json.dumps({k: {"a": p.a, "b": p.b} for k, p in calibration.items()}).encode(),
    )
    logged: dict[str, dict[str, Any]] = {}
    for f in fitted:
        save_adapter(f.adapter, folder / f.name, source=f.source.ref, target=f.target.ref)
        plot = folder / f"{f.name}-curve.png"
        metrics = {**f.metrics, **curve_metrics(f, x_old[cut:], x_new[cut:], calibration, plot)}
        with ctx.session() as s:
            row = log_adapter(
                s, ctx.registry, f.name, folder / f.name, f.adapter, f.source, f.target,
                metrics, pairs_hash=pairs_hash, plots=(plot,),
            )  # fmt: skip
            logged[f.name] = {
                "id": row.id,
                "kind": f.adapter.kind,
                "uri": row.mlflow_model_uri,
                "metrics": metrics,
            }
    return logged, selection


def step_train(ctx: Context, job_id: int) -> None:
    """Fit, measure, save and register the job's adapters; then the job is gated."""
    with ctx.session() as s:
        if job_row(s, job_id).state != JobState.TRAINING:
            return
    if serves_compatible(ctx, job_id):
        _identity_basis(ctx, job_id)
        return
    v = job_versions(ctx, job_id)
    ids, x_old, x_new = paired_vectors(ctx, job_id)
    pairs_hash = hashlib.sha256(np.ascontiguousarray(ids).tobytes()).hexdigest()[:16]
    logged, selection = fit_and_log(ctx, job_dir(ctx, job_id), x_old, x_new, v.old, v.new,
                                    pairs_hash)  # fmt: skip
    with ctx.session(write=True) as s:
        job = job_row(s, job_id, lock=True)
        job.report = {
            **job.report,
            "bridge": {**selection, "mlflow_uri": logged["bridge"]["uri"]},
            "adapters": logged,
        }
        if job.state == JobState.TRAINING:
            transition(job, JobState.GATED)


def _identity_basis(ctx: Context, job_id: int) -> None:
    """A declared-compatible version needs no fitting: its basis is the identity."""
    v = job_versions(ctx, job_id)
    folder = job_dir(ctx, job_id)
    save_adapter(
        BasisAdapter.identity(v.new.dim, v.old.dim), folder / "basis", v.new.ref, v.old.ref
    )
    with ctx.session(write=True) as s:
        job = job_row(s, job_id, lock=True)
        job.report = {**job.report, "bridge": {"kind": "none", "compatible_by": v.new.tags}}
        if job.state == JobState.TRAINING:
            transition(job, JobState.GATED)
