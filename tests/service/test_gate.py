"""Without labels the gate never serves a plan that can fall below the old model: a
bridge-type plan needs the operator's override, which is recorded, and every search
served by it carries the warning. An external old model gets `dual` (clients send both
encodings), never a bridge on its own."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from embcompat.registry import versions
from embcompat.service import galleries, search, upgrade
from embcompat.service.context import Context
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
