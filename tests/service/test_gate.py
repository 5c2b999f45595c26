"""Without labels the gate never serves a plan that can fall below the old model: a
bridge-type plan needs the operator's override, which is recorded, and every search
served by it carries the warning. An external old model gets `dual` (clients send both
encodings), never a bridge on its own. With labels, every plan is measured and the
no-regret plan with the highest lowest point is served."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from embcompat.registry import versions
from embcompat.service import galleries, search, upgrade
from embcompat.service.context import Context
from embcompat.service.upgrade import gate
from embcompat.settings import Settings

TEXTS = [f"w{n % 7} w{n % 11} u{n}" for n in range(60)]


@pytest.fixture
def ctx(hash_dir: Path, tmp_path: Path) -> Iterator[Context]:
    """Gallery `ext` served by `hash:x16`, an external version whose vectors the client
    computes (here with hash:v1's encoder), with the texts stored beside them."""
    shutil.copytree(hash_dir, tmp_path / "data")
    with Context(Settings(data_dir=tmp_path / "data")) as context:
        with context.session() as s:
            versions.register_version(
                s, context.registry, model="hash", version="x16", dim=16, source="external",
                models_dir=context.models_dir, policy=context.model_policy,
            )  # fmt: skip
            v1 = versions.get_version(s, context.registry, "hash", "v1")
        vectors = context.encoder(v1).encode(TEXTS)
        galleries.create_gallery(context, "ext", "hash", "x16")
        galleries.ingest(context, "ext", [
            galleries.ItemIn(f"i{n}", t, vectors[n].tolist()) for n, t in enumerate(TEXTS)
        ])  # fmt: skip
        yield context


def served(ctx: Context, plan: str, override: bool = False) -> tuple[str, dict]:
    job = upgrade.start_upgrade(ctx, "ext", "hash", "v2", plan, pairs=50, override=override)
    rec = upgrade.run_in_process(ctx, job.id, stop_after=0)
    return str(rec.plan), rec.report["gate"]


def _search(ctx: Context) -> search.SearchResponse:
    with ctx.session() as s:
        v1 = versions.get_version(s, ctx.registry, "hash", "v1")
        v2 = versions.get_version(s, ctx.registry, "hash", "v2")
    q = TEXTS[:3]
    return search.search(ctx, "ext", vectors=ctx.encoder(v2).encode(q),
                         old_vectors=ctx.encoder(v1).encode(q), k=5)  # fmt: skip


@pytest.mark.parametrize("requested", ["auto", "bridge", "mapped", "basis", "cascade"])
def test_no_bridge_without_labels_or_an_override(ctx: Context, requested: str) -> None:
    plan, gate = served(ctx, requested)
    assert plan == "dual", gate
    assert "override" not in gate and "warning" not in gate
    if requested in ("bridge", "mapped", "basis"):
        assert "without labels" in gate["reason"]
    assert "external" in gate["reason"]
    res = _search(ctx)
    assert res.plan == "dual" and res.warnings == []
    paths = {h.path for row in res.hits for h in row}
    assert "old" in paths and paths <= {"old", "new"}  # the paired sample is in v2 already


@pytest.mark.parametrize("requested", ["bridge", "mapped"])
def test_the_override_serves_it_and_says_so_on_every_search(ctx: Context, requested: str) -> None:
    plan, gate = served(ctx, requested, override=True)
    assert plan == requested and gate["override"] is True
    assert "operator's override" in gate["warning"] and "hash:x16" in gate["warning"]
    res = _search(ctx)
    assert res.plan == requested and res.warnings[0] == gate["warning"]
    job = upgrade.get_job(ctx, 1)
    assert job.to_dict()["report"]["gate"]["warning"] == gate["warning"]


def _points(
    day_one: float, final: float, lost: int = 0, won: int = 0, queries: int = 500
) -> dict[str, object]:
    regret = lost - won > 2 * (lost + won) ** 0.5
    return {"r10_day_one": day_one, "r10_final": final, "lowest": min(day_one, final),
            "queries_lost": lost, "queries_won": won, "no_regret": not regret,
            "queries": queries}  # fmt: skip


def test_with_labels_the_highest_lowest_point_among_no_regret_plans_is_served(
    ctx: Context,
) -> None:
    with ctx.session() as s:
        v1 = versions.get_version(s, ctx.registry, "hash", "v1")
        v2 = versions.get_version(s, ctx.registry, "hash", "v2")
    measured = {
        "dual": _points(0.60, 0.70),
        "cascade": _points(0.66, 0.72, lost=3, won=12),
        "bridge": _points(0.75, 0.70, lost=40, won=10),  # highest, but below v1 on day one
        "mapped": _points(0.61, 0.70, lost=5, won=6),
    }
    plan, reason, warning = gate.choose_plan("auto", False, v1, v2, measured=measured)
    assert (plan, warning) == ("cascade", None) and "highest lowest point" in reason
    plan, reason, warning = gate.choose_plan("bridge", True, v1, v2, measured=measured)
    assert plan == "cascade" and "below hash:v1" in reason and warning is None
    plan, _, warning = gate.choose_plan("bridge", True, v1, v2, override=True, measured=measured)
    assert plan == "bridge" and warning and "labelled probe shows it below" in warning
    plan, reason, warning = gate.choose_plan("mapped", False, v1, v2, measured=measured)
    assert (plan, warning) == ("mapped", None) and "no-regret" in reason  # labels, no override
    nothing = {p: _points(0.5, 0.5, lost=30, won=0) for p in ("cascade", "bridge")}
    plan, reason, _ = gate.choose_plan("auto", False, v1, v2, measured=nothing)
    assert plan == "cascade" and "no plan is no-regret" in reason
    few = {**measured, "mapped": _points(0.9, 0.9, won=1, queries=20)}  # 1 won, 0 lost
    plan, _, _ = gate.choose_plan("auto", False, v1, v2, measured=few)
    assert plan == "cascade"  # too few probe queries to trust an adapter on labels
    plan, reason, _ = gate.choose_plan("mapped", False, v1, v2, measured=few)
    assert plan == "cascade" and "without labels" in reason


def test_a_probe_measures_every_plan_through_an_upgrade(ctx: Context) -> None:
    """hash:v2 is an exact rotation of hash:v1: with labels, the bridge is shown to be no
    worse than v1, so it is served as requested without an override."""
    texts = [f"w{n % 7} w{n % 11} w{n % 13} u{n}" for n in range(150)]
    galleries.create_gallery(ctx, "g", "hash", "v1")
    galleries.ingest(ctx, "g", [galleries.ItemIn(f"i{n}", t) for n, t in enumerate(texts)])
    probe = [{"text": t, "relevant": [f"i{n}"]} for n, t in enumerate(texts)]
    job = upgrade.start_upgrade(ctx, "g", "hash", "v2", "bridge", pairs=150, probe=probe)
    rec = upgrade.run_in_process(ctx, job.id, stop_after=0)
    measured = rec.report["gate"]["probe"]["plans"]
    assert set(measured) == {"dual", "cascade", "bridge", "mapped"}
    assert measured["bridge"]["no_regret"] and measured["bridge"]["r10_day_one"] >= 0.9
    assert rec.plan == "bridge" and "warning" not in rec.report["gate"]
