"""A whole upgrade in-process on real models: refusals before anything runs, the state
machine, the chunk ledger, search at every step, finalize and rollback."""

from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import select

from embcompat.errors import InvalidTransition, UpgradeInProgress, UpgradeRefused
from embcompat.kinds import JobState
from embcompat.registry import versions
from embcompat.registry.schema import Item, Job, JobChunk
from embcompat.service import galleries, search, upgrade
from embcompat.service.context import Context
from embcompat.service.upgrade.jobs import job_adapter
from tests.conftest import wordnet_items

pytestmark = pytest.mark.slow


@pytest.fixture
def gallery(text_ctx: Context) -> tuple[Context, list[str], list[int], list]:
    items, queries, relevant = wordnet_items(240)
    galleries.create_gallery(text_ctx, "docs", "text", "v1")
    galleries.ingest(text_ctx, "docs", items)
    galleries.publish(text_ctx, "docs")
    return text_ctx, queries, relevant, items


def _recall(ctx: Context, queries: list[str], relevant: list[int], items: list) -> float:
    res = search.search(ctx, "docs", texts=queries, k=10)
    found = [
        items[r].id in {h.item for h in hits} for hits, r in zip(res.hits, relevant, strict=True)
    ]
    return float(np.mean(found))


def test_refusals_happen_before_anything_runs(gallery: tuple, models_dir) -> None:
    ctx = gallery[0]
    with ctx.session() as s:
        versions.register_version(
            s,
            ctx.registry,
            model="other",
            version="x",
            dim=384,
            source="external",
            models_dir=models_dir,
            policy=ctx.model_policy,
        )
        versions.register_version(
            s,
            ctx.registry,
            model="text",
            version="ext",
            dim=64,
            source="external",
            models_dir=models_dir,
            policy=ctx.model_policy,
        )
    galleries.create_gallery(ctx, "empty", "text", "v1")
    with pytest.raises(UpgradeRefused, match="version of another model"):
        upgrade.start_upgrade(ctx, "docs", "other", "x")
    with pytest.raises(UpgradeRefused, match="is external: nothing can encode"):
        upgrade.start_upgrade(ctx, "docs", "text", "ext", plan="backfill")
    with pytest.raises(UpgradeRefused, match="'empty' is empty"):
        upgrade.start_upgrade(ctx, "empty", "text", "v2")
    assert upgrade.latest_job(ctx, "docs") is None


def test_upgrade_end_to_end_with_search_at_every_step(gallery: tuple) -> None:
    ctx, queries, relevant, items = gallery
    before = _recall(ctx, queries, relevant, items)
    job = upgrade.start_upgrade(ctx, "docs", "text", "v2", pairs=80, chunk_size=40)
    with pytest.raises(UpgradeInProgress, match="already has upgrade job"):
        upgrade.start_upgrade(ctx, "docs", "text", "v2")
    states, recalls = [], []

    def on_chunk(rec: upgrade.JobRecord) -> None:
        states.append(rec.state)
        recalls.append(_recall(ctx, queries, relevant, items))

    # stop after two chunks (like Ctrl-C), then resume: nothing is redone
    partial = upgrade.run_in_process(ctx, job.id, on_chunk, stop_after=2)
    assert partial.state == "backfilling" and partial.plan == "cascade"
    assert partial.report["gate"]["held_out_pairs"] == 16
    subset = [it.id for it in items[1::3]]  # the cascade keeps a filter on both proposers
    res = search.search(ctx, "docs", texts=queries[:10], k=10, filters={"id": subset})
    assert all(len(row) == 10 and {h.item for h in row} <= set(subset) for row in res.hits)
    with ctx.session() as s:
        attempts_before = {c.seq: c.attempts for c in s.query(JobChunk).filter_by(job_id=job.id)}
    final = upgrade.run_in_process(ctx, job.id, on_chunk)
    assert final.state == "done" and final.items_done == final.items_total == 240
    with ctx.session() as s:
        chunks = s.query(JobChunk).filter_by(job_id=job.id).all()
    assert all(c.state == "done" for c in chunks)
    assert all(c.attempts == 1 for c in chunks if attempts_before.get(c.seq) == 1)
    g = galleries.get_gallery(ctx, "docs")
    assert g.serving_version == "v2" and g.plan is None
    with ctx.session() as s:
        assert versions.serving_version(s, ctx.registry, "text").version == "v2"
    with ctx.session() as s:
        v2 = versions.get_version(s, ctx.registry, "text", "v2")
    ids = galleries.space_store(ctx, "docs", v2).snapshot().ids
    assert len(ids) == len(np.unique(ids)) == 240
    after = _recall(ctx, queries, relevant, items)
    assert min(recalls) >= before - 0.05, (before, recalls)
    assert after >= before - 0.05
    res = search.search(ctx, "docs", texts=queries[:1], k=3)
    assert res.plan == "single" and res.hits[0][0].version == "v2"


def test_pause_resume_cancel_and_rollback_follow_the_state_machine(gallery: tuple) -> None:
    ctx = gallery[0]
    job = upgrade.start_upgrade(ctx, "docs", "text", "v2", pairs=60, chunk_size=60)
    upgrade.run_in_process(ctx, job.id, stop_after=0)
    assert upgrade.pause(ctx, job.id).state == "paused"
    with pytest.raises(InvalidTransition, match="cannot go from paused to done"):
        with ctx.session() as s:
            upgrade.transition(s.get(Job, job.id), JobState.DONE)
    assert upgrade.resume(ctx, job.id).state == "backfilling"
    rolled = upgrade.rollback(ctx, job.id)
    assert rolled.state == "rolled_back"
    g = galleries.get_gallery(ctx, "docs")
    assert g.serving_version == "v1" and g.plan is None
    assert search.search(ctx, "docs", texts=["a dog"], k=3).plan == "single"
    with pytest.raises(InvalidTransition):
        upgrade.cancel(ctx, job.id)
    second = upgrade.start_upgrade(ctx, "docs", "text", "v2", pairs=60)
    assert upgrade.cancel(ctx, second.id).state == "cancelled"


@pytest.mark.parametrize("plan", ["mapped", "bridge", "dual", "basis"])
def test_each_plan_serves_mid_upgrade_with_its_paths(gallery: tuple, plan: str) -> None:
    ctx, queries, relevant, items = gallery
    job = upgrade.start_upgrade(
        ctx, "docs", "text", "v2", plan=plan, pairs=60, chunk_size=60, override=plan != "dual"
    )
    rec = upgrade.run_in_process(ctx, job.id, stop_after=1)
    gate = rec.report["gate"]
    expected = plan  # bridge-type plans on the override (tests/service/test_gate.py)
    assert rec.plan == expected, gate
    if plan == "mapped":
        with ctx.session() as s:
            old = versions.get_version(s, ctx.registry, "text", "v1")
            new = versions.get_version(s, ctx.registry, "text", "v2")
        # a linear mapper is folded into the query: one scale per item, no mapped vectors
        scales = galleries.mapped_store(ctx, "docs", old, new, job.id, folded=True)
        assert len(scales) == len(items) and scales.dim == 1
        mapper = job_adapter(ctx, job.id, "mapper", old, new)
        q = ctx.encoder(new).encode(queries[:5])
        res = search.search(ctx, "docs", vectors=q, k=10)
        with ctx.session() as s:
            by_name = dict(s.execute(select(Item.external_id, Item.id)).all())
        for row, qv in zip(res.hits, q, strict=True):  # scored as the written vectors would be
            mapped_hits = [h for h in row if h.path == "mapped"]
            x, _ = galleries.space_store(ctx, "docs", old).get(
                np.array([by_name[h.item] for h in mapped_hits])
            )
            want = mapper.transform(x) @ qv
            np.testing.assert_allclose([h.score_old for h in mapped_hits], want, atol=1e-5)
    res = search.search(ctx, "docs", texts=queries[:20], k=10)
    paths = {h.path for row in res.hits for h in row}
    old_path = {"dual": "old"}.get(expected, expected)
    assert res.plan == expected and paths <= {"new", old_path} and old_path in paths
    assert all(len({h.item for h in row}) == len(row) == 10 for row in res.hits)
    assert _recall(ctx, queries, relevant, items) > 0.3
    # a filter holds on both sides of the mixed gallery, and k stays full
    subset = [it.id for it in items[::4]]
    res = search.search(ctx, "docs", texts=queries[:20], k=10, filters={"id": subset})
    assert all(len(row) == 10 and {h.item for h in row} <= set(subset) for row in res.hits)
    assert {h.path for row in res.hits for h in row} == {"new", old_path}


def test_a_labelled_probe_sets_the_fusion_and_decides_whether_v1_is_kept(gallery: tuple) -> None:
    ctx, queries, relevant, items = gallery
    probe = [{"text": q, "relevant": [items[r].id]} for q, r in zip(queries, relevant, strict=True)]
    job = upgrade.start_upgrade(ctx, "docs", "text", "v2", pairs=160, chunk_size=80, probe=probe)
    done = upgrade.run_in_process(ctx, job.id)
    measured = done.report["gate"]["probe"]
    assert measured["queries"] >= 10 and measured["sub_gallery"] == 160
    assert 0.0 <= measured["weight"] <= 1.0 and measured["cascade_k"] in (50, 100, 200)
    learned_wins = measured["cv_r10_learned"] > measured["cv_r10_rrf"]
    assert measured["merge"] == ("learned" if learned_wins else "rrf"), measured
    assert measured["downgrade"] is False, measured
    assert measured["fusion_gain"] == pytest.approx(
        measured["r10_cascade"] - measured["r10_new_new"]
    )
    decision = done.report["finalize"]
    assert decision["keep_old"] == measured["keep_old_at_100"]
    res = search.search(ctx, "docs", texts=queries[:5], k=10)
    assert res.plan == ("cascade" if decision["keep_old"] else "single"), decision


def test_staged_items_are_encoded_by_the_ingest_step(text_ctx: Context) -> None:
    from embcompat.workers.app import dispatch_ingest

    items, queries, relevant = wordnet_items(80)
    galleries.create_gallery(text_ctx, "staged", "text", "v1")
    assert galleries.stage(text_ctx, "staged", items) == 80
    assert galleries.stats(text_ctx, "staged")["items_per_version"] == {"v1": 0}
    assert dispatch_ingest(text_ctx, "staged") == "done"  # no broker: in-process
    assert galleries.stats(text_ctx, "staged")["items_per_version"] == {"v1": 80}
    hits = search.search(text_ctx, "staged", texts=queries[:1], k=10).hits[0]
    assert items[relevant[0]].id in {h.item for h in hits}
    assert galleries.encode_staged(text_ctx, "staged") == 0
