"""Registration reports: what upgrading each gallery served by a model to a version just
registered (or marked `candidate`) would do, measured before any upgrade.

Per gallery, on a random sample of its stored texts encoded by both versions: the
adapters fitted as an upgrade would fit them, the label-free figures (the bridge's
neighbour recall against v1's, advice only), the labelled ones when the gallery stores
a probe (every plan's R@10 on day one and at 100 %), the plan the gate would choose and
why, and the backfill time projected from the encoders' measured throughput. Logged as
an MLflow run tagged with the version (metrics and the curve plots), kept in
`version_reports` and served at GET /models/{model}/versions/{version}/report.
"""

from __future__ import annotations

import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import func, select

from embcompat.errors import EmbcompatError, UnknownReport
from embcompat.kinds import Alias, UpgradePlan
from embcompat.registry import versions
from embcompat.registry.records import ModelVersionRecord
from embcompat.registry.schema import EmbeddingModel, Gallery, Item, ModelVersion, VersionReport
from embcompat.service.context import Context
from embcompat.service.galleries import get_probe, version_record
from embcompat.service.upgrade.fitting import FIT_SHARE, MIN_SAMPLE, curve_metrics, fit_adapters
from embcompat.service.upgrade.gate import choose_plan, proxy_bridge_check
from embcompat.service.upgrade.jobs import declared_compatible
from embcompat.service.upgrade.probe import measure as probe_measure

SAMPLE = 2000  # items per gallery encoded by both versions


def request_report(ctx: Context, model: str, version: str) -> bool:
    """Mark the version's report pending if a gallery is served by another version of
    its model (what the report is about); returns whether one should be dispatched."""
    with ctx.session(write=True) as s:
        row = versions.get_version_row(s, model, version)
        served = s.scalar(
            select(func.count(Gallery.id))
            .join(ModelVersion, Gallery.serving_version_id == ModelVersion.id)
            .where(ModelVersion.model_id == row.model_id, Gallery.serving_version_id != row.id)
        )
        if not served:
            return False
        report = s.get(VersionReport, row.id)
        if report is None:
            s.add(VersionReport(version_id=row.id, state="pending", report={}))
        else:
            report.state, report.error, report.finished_at = "pending", None, None
            report.requested_at = datetime.now(UTC)
        return True


def candidates_without_report(ctx: Context) -> list[tuple[str, str]]:
    """(model, version) of each version that carries MLflow's `candidate` alias (set by a
    registration workflow straight in MLflow, not through this service) and has no
    report yet, among the models serving a gallery: the beat asks for their reports."""
    with ctx.session() as s:
        rows = s.execute(
            select(EmbeddingModel.name, ModelVersion.mlflow_name)
            .join(ModelVersion, ModelVersion.model_id == EmbeddingModel.id)
            .join(Gallery, Gallery.serving_version_id == ModelVersion.id)
            .distinct()
        ).all()
    out = []
    for model, mlflow_name in rows:
        if not mlflow_name:
            continue
        number = ctx.registry.alias_version(mlflow_name, Alias.CANDIDATE)
        if number is None:
            continue
        with ctx.session() as s:
            row = s.scalars(
                select(ModelVersion).where(
                    ModelVersion.mlflow_name == mlflow_name, ModelVersion.mlflow_version == number
                )
            ).first()
            if row is not None and s.get(VersionReport, row.id) is None:
                out.append((model, row.version))
    return out


def get_report(ctx: Context, model: str, version: str) -> dict[str, Any]:
    with ctx.session() as s:
        row = versions.get_version_row(s, model, version)
        report = s.get(VersionReport, row.id)
        if report is None:
            raise UnknownReport(
                f"{model}:{version} has no report: no gallery is served by another version "
                f"of {model!r}, or it was registered before reports existed",
                model=model,
                version=version,
            )
        return {
            "model": model,
            "version": version,
            "state": report.state,
            "requested_at": report.requested_at.isoformat(),
            "finished_at": report.finished_at.isoformat() if report.finished_at else None,
            "mlflow_run_id": report.mlflow_run_id,
            "error": report.error,
            **report.report,
        }


def run_report(ctx: Context, model: str, version: str) -> str:
    """Measure and store the report (the workers' task); returns its final state. A
    failure is stored with its message: the report of a version never blocks it."""
    with ctx.session() as s:
        new = versions.get_version(s, ctx.registry, model, version)
        served = s.execute(
            select(Gallery.name, Gallery.serving_version_id)
            .join(ModelVersion, Gallery.serving_version_id == ModelVersion.id)
            .join(EmbeddingModel, ModelVersion.model_id == EmbeddingModel.id)
            .where(EmbeddingModel.name == model, Gallery.serving_version_id != new.id)
            .order_by(Gallery.name)
        ).all()
        olds = {name: version_record(ctx, s, vid) for name, vid in served}
    state, error, run_id, body = "done", None, None, {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            per = {name: _gallery(ctx, name, old, new, Path(tmp)) for name, old in olds.items()}
            body = {"galleries": per}
            run_id = _log(ctx, new, per, Path(tmp))
    except EmbcompatError as exc:
        state, error = "failed", f"{exc.code}: {exc.message}"
    except Exception as exc:  # the report is advice: store why it failed, never raise
        state, error = "failed", f"internal_error: {type(exc).__name__}: {exc}"
    with ctx.session(write=True) as s:
        row = s.get(VersionReport, new.id) or VersionReport(version_id=new.id, report={})
        row.state, row.error, row.report, row.mlflow_run_id = state, error, body, run_id
        row.finished_at = datetime.now(UTC)
        s.add(row)
    return state


def _sample(ctx: Context, gallery: str) -> tuple[np.ndarray, list[str], int]:
    """(ids, texts) of up to SAMPLE items with stored text, and the gallery's size."""
    with ctx.session() as s:
        g_id = s.scalar(select(Gallery.id).where(Gallery.name == gallery))
        rows = s.execute(
            select(Item.id, Item.payload).where(
                Item.gallery_id == g_id, Item.payload.is_not(None), Item.payload != ""
            )
        ).all()
        total = s.scalar(select(func.count(Item.id)).where(Item.gallery_id == g_id)) or 0
    pick = np.sort(np.random.default_rng(0).permutation(len(rows))[:SAMPLE])
    return np.array([rows[i][0] for i in pick], np.int64), [rows[i][1] for i in pick], total


def _gallery(
    ctx: Context, gallery: str, old: ModelVersionRecord, new: ModelVersionRecord, plots: Path
) -> dict[str, Any]:
    out: dict[str, Any] = {"from": old.ref, "to": new.ref}
    if declared_compatible(old, new):
        out["plan"], out["reason"] = "basis", f"{new.ref} was trained compatible with {old.ref}"
        out["items_to_reembed"] = 0
        return out
    if old.external or new.external:
        plan, reason, _ = choose_plan(UpgradePlan.AUTO, False, old, new)
        note = "an external version: nothing here can encode a sample to measure"
        return {**out, "plan": str(plan), "reason": reason, "note": note}
    ids, texts, total = _sample(ctx, gallery)
    if len(texts) < MIN_SAMPLE:
        return {**out, "note": f"{len(texts)} items with stored text: too few to measure"}
    rates = {}
    encoded = {}
    for side, v in (("old", old), ("new", new)):
        encoder = ctx.encoder(v)  # loaded before the clock starts: the rate is encoding's
        t0 = time.perf_counter()
        encoded[side] = encoder.encode(texts, ctx.settings.encode_batch_size)
        rates[side] = len(texts) / max(time.perf_counter() - t0, 1e-9)
    x_old, x_new = encoded["old"], encoded["new"]
    cut = int(FIT_SHARE * len(x_old))
    fitted, calibration, selection = fit_adapters(x_old[:cut], x_new[:cut], old, new)
    adapters = {f.name: f.adapter for f in fitted}
    old_old, new_old = proxy_bridge_check(adapters["bridge"], x_old[cut:], x_new[cut:])
    curves = {
        f.name: curve_metrics(f, x_old[cut:], x_new[cut:], calibration,
                              plots / f"{gallery}-{f.name}-curve.png")
        for f in fitted if f.name != "basis"
    }  # fmt: skip
    probe = get_probe(ctx, gallery)
    labelled = None
    if probe:
        with ctx.session() as s:
            g_id = s.scalars(select(Gallery.id).where(Gallery.name == gallery)).one()
        labelled = probe_measure(ctx, g_id, probe, ids, x_old, x_new, old, new, total, adapters)
    measured = (labelled or {}).get("plans")
    plan, reason, _ = choose_plan(UpgradePlan.AUTO, new_old >= old_old, old, new, measured=measured)
    if labelled and labelled.get("downgrade"):  # what the gate would do: refuse it
        why = (
            f"a downgrade on the stored probe: M(new,new) {labelled['r10_new_new']:.3f} < "
            f"M(old,old) {labelled['r10_old_old']:.3f}; the gate would refuse the upgrade"
        )
        return {**out, "sample": len(texts), "items": total, "labelled": labelled,
                "plan": None, "expected_r10": None, "reason": why}  # fmt: skip
    expected = None
    if labelled and measured and str(plan) in measured:
        point = measured[str(plan)]
        expected = {
            "r10_old_old": labelled["r10_old_old"],
            "r10_day_one": point["r10_day_one"],
            "r10_final": point["r10_final"],
        }
    return {
        **out,
        "sample": len(texts),
        "items": total,
        "items_to_reembed": total,
        "encoder_items_per_s": rates,
        "projected_backfill_s": total / rates["new"],
        "bridge_kind": selection["kind"],
        "label_free": {
            "proxy_r10_old_old": old_old,
            "proxy_r10_new_old": new_old,
            "advice_only": True,
            "curves": curves,
        },  # fmt: skip
        "labelled": labelled,
        "plan": str(plan),
        "reason": reason,
        "expected_r10": expected,
    }


def _log(ctx: Context, new: ModelVersionRecord, per: dict[str, Any], plots: Path) -> str:
    """The report as an MLflow run tagged with the version (its metrics flattened, the
    curve plots as artifacts), linked from the version by the tag `report_run_id`."""
    metrics = {}
    for gallery, r in per.items():
        for key in ("projected_backfill_s",):
            if key in r:
                metrics[f"{gallery}.{key}"] = float(r[key])
        for key, value in (r.get("expected_r10") or {}).items():
            metrics[f"{gallery}.{key}"] = float(value)
        for key in ("proxy_r10_old_old", "proxy_r10_new_old"):
            if r.get("label_free"):
                metrics[f"{gallery}.{key}"] = float(r["label_free"][key])
    tags = {"embcompat.report": "upgrade", "model": new.model, "version": new.version}
    with ctx.registry.run(f"report {new.ref}", tags) as run:
        ctx.registry.mlflow.log_metrics(metrics)
        ctx.registry.mlflow.log_dict(per, "report.json")
        for plot in sorted(plots.glob("*.png")):
            ctx.registry.mlflow.log_artifact(str(plot), artifact_path="curves")
        run_id = str(run.info.run_id)
    if new.mlflow_name and new.mlflow_version:
        ctx.registry.set_tag(new.mlflow_name, new.mlflow_version, "report_run_id", run_id)
    return run_id
