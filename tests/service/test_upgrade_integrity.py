"""Rows of the integrity review, as tests: no stale vector after a cancelled upgrade,
pause and resume anywhere continue to the end, a failure is a `failed` job with its
error, and requests that could never succeed are refused before anything runs."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from embcompat.errors import CorruptArtifact, InvalidInput, UpgradeRefused
from embcompat.kinds import JobState
from embcompat.registry import versions
from embcompat.service import galleries, search, upgrade
from embcompat.service.context import Context
from embcompat.settings import Settings

ITEMS = [galleries.ItemIn(f"i{n}", f"w{n % 7} w{n % 11} u{n}") for n in range(45)]


@pytest.fixture
def ctx(hash_dir: Path, tmp_path: Path) -> Iterator[Context]:
    shutil.copytree(hash_dir, tmp_path / "data")
    with Context(Settings(data_dir=tmp_path / "data")) as context:
        galleries.create_gallery(context, "g", "hash", "v1")
        galleries.ingest(context, "g", ITEMS)
        galleries.publish(context, "g")
        yield context


def top(ctx: Context, text: str) -> tuple[str, float]:
    hit = search.search(ctx, "g", texts=[text], k=1).hits[0][0]
    return hit.item, hit.score


def test_a_cancelled_upgrade_leaves_no_stale_vector(ctx: Context) -> None:
    job = upgrade.start_upgrade(ctx, "g", "hash", "v2", "dual", pairs=50)
    upgrade.step_pair(ctx, job.id)  # the sample now has v2 vectors
    upgrade.pause(ctx, job.id)
    upgrade.cancel(ctx, job.id)
    galleries.ingest(ctx, "g", [galleries.ItemIn("i3", "brand new words u3")])
    again = upgrade.start_upgrade(ctx, "g", "hash", "v2", "dual", pairs=50)
    assert upgrade.run_in_process(ctx, again.id).state == JobState.DONE
    assert top(ctx, "brand new words u3")[0] == "i3"
    old_item, old_score = top(ctx, ITEMS[3].text)
    assert old_item != "i3" or old_score < 0.99  # the old text no longer finds it exactly
    stats = galleries.stats(ctx, "g")
    assert stats["items_per_version"] == {"v2": 45}
    back = upgrade.start_upgrade(ctx, "g", "hash", "v1", "dual", pairs=50)
    assert upgrade.run_in_process(ctx, back.id).state == JobState.DONE
    assert galleries.stats(ctx, "g")["items_per_version"] == {"v1": 45}
    assert top(ctx, "brand new words u3")[0] == "i3"


@pytest.mark.parametrize(
    "pause_in", [JobState.PLANNED, JobState.TRAINING, JobState.GATED, JobState.BACKFILLING]
)
def test_pause_and_resume_anywhere_continue_to_the_end(ctx: Context, pause_in: str) -> None:
    job = upgrade.start_upgrade(ctx, "g", "hash", "v2", "bridge", pairs=50, chunk_size=10)
    steps = [upgrade.step_pair, upgrade.step_train, upgrade.step_gate,
             upgrade.step_start_backfill]  # fmt: skip
    while upgrade.get_job(ctx, job.id).state != pause_in:
        steps.pop(0)(ctx, job.id)
    for _ in range(2):
        assert upgrade.pause(ctx, job.id).state == JobState.PAUSED
        assert upgrade.resume(ctx, job.id).state == pause_in
    done = upgrade.run_in_process(ctx, job.id)
    assert done.state == JobState.DONE and done.progress == 1.0, done


def test_pairing_interrupted_then_resumed_finishes(ctx: Context) -> None:
    job = upgrade.start_upgrade(ctx, "g", "hash", "v2", "dual", pairs=50)
    with ctx.session(write=True) as s:  # a worker died inside pairing
        upgrade.transition(s.get(upgrade.states.Job, job.id), JobState.PAIRING)
    upgrade.pause(ctx, job.id)
    assert upgrade.resume(ctx, job.id).state == JobState.PAIRING
    assert upgrade.run_in_process(ctx, job.id).state == JobState.DONE


def test_requests_that_cannot_succeed_are_refused_up_front(ctx: Context) -> None:
    with ctx.session() as s:
        versions.register_version(
            s, ctx.registry, model="hash", version="ext", dim=24, source="external",
            parent="v1", models_dir=ctx.models_dir, policy=ctx.model_policy,
        )  # fmt: skip
    with pytest.raises(UpgradeRefused, match="external"):
        upgrade.start_upgrade(ctx, "g", "hash", "ext", "bridge", pairs=50)
    galleries.create_gallery(ctx, "small", "hash", "v1")
    galleries.ingest(ctx, "small", ITEMS[:10])
    with pytest.raises(UpgradeRefused, match="at least 40"):
        upgrade.start_upgrade(ctx, "small", "hash", "v2", "bridge", pairs=50)
    galleries.create_gallery(ctx, "vec", "hash", "ext")
    with pytest.raises(InvalidInput, match="cannot encode"):
        galleries.stage(ctx, "vec", [galleries.ItemIn("a", "some text")])


def test_a_failing_step_fails_the_job_with_its_error_and_frees_the_gallery(
    ctx: Context,
) -> None:
    job = upgrade.start_upgrade(ctx, "g", "hash", "v2", "dual", pairs=50)
    pairs = upgrade.job_dir(ctx, job.id)
    upgrade.step_pair(ctx, job.id)
    (pairs / "pairs.npy").write_bytes(b"not an array")  # training cannot read its sample
    with pytest.raises(Exception):  # noqa: B017 - any error; the job must say which
        upgrade.run_in_process(ctx, job.id)
    failed = upgrade.get_job(ctx, job.id)
    assert failed.state == JobState.FAILED and failed.error
    second = upgrade.start_upgrade(ctx, "g", "hash", "v2", "dual", pairs=50)
    assert upgrade.run_in_process(ctx, second.id).state == JobState.DONE
    assert upgrade.get_job(ctx, job.id).state == JobState.CANCELLED  # superseded


MORE = [galleries.ItemIn(f"m{n}", f"w{n % 5} w{n % 13} m{n}") for n in range(60)]


def mapped_job(ctx: Context) -> int:
    """An upgrade gated to the mapped plan, of 105 items of which 50 are paired: the
    other 55 have no v2 vector, so only the mapped space answers for them."""
    galleries.ingest(ctx, "g", MORE)
    job = upgrade.start_upgrade(ctx, "g", "hash", "v2", "mapped", pairs=50, chunk_size=30,
                                override=True)  # fmt: skip
    for step in (upgrade.step_pair, upgrade.step_train, upgrade.step_gate):
        step(ctx, job.id)
    assert upgrade.get_job(ctx, job.id).plan == "mapped"
    return job.id


def found(ctx: Context) -> list[str]:
    return [top(ctx, it.text)[0] for it in ITEMS + MORE]


EVERY = [it.id for it in ITEMS + MORE]


def test_a_mapped_plan_serves_no_partial_map(ctx: Context) -> None:
    """Between the gate and the end of the map step, a mapped plan's space holds only the
    chunks mapped so far: the gallery keeps serving its old version alone until the
    whole gallery is mapped, so no item drops out of the results meanwhile."""
    job_id = mapped_job(ctx)
    (seqs,) = upgrade.map_batches(ctx, job_id)
    for n in range(len(seqs)):  # every item is found by its own text, chunk by chunk
        assert found(ctx) == EVERY, n
        assert search.search(ctx, "g", texts=["w1"], k=3).plan == "single"
        assert upgrade.get_job(ctx, job_id).state == JobState.GATED
        upgrade.map_chunks(ctx, job_id, [seqs[n]])
    upgrade.publish_mapped(ctx, job_id)
    assert upgrade.get_job(ctx, job_id).state == JobState.SERVING_BRIDGE
    upgrade.step_start_backfill(ctx, job_id)
    assert search.search(ctx, "g", texts=["w1"], k=3).plan == "mapped"
    assert found(ctx) == EVERY


@pytest.mark.parametrize("when", ["mapped_side", "plan_search"])
def test_a_search_racing_the_jobs_end_never_recreates_its_mapped_space(
    ctx: Context, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    """The job is cancelled (and its mapped space dropped) after a search read its state,
    before it opened the space or between opening and reading it: the search reads the
    state again and answers from the old version alone, complete, instead of creating
    an empty mapped space and missing every old item (or failing)."""
    job_id = mapped_job(ctx)
    upgrade.prepare(ctx, job_id)
    vectors = galleries.gallery_dir(ctx, "g") / "vectors"
    assert len(list(vectors.glob("*-job*"))) == 1
    search.search(ctx, "g", texts=["w1"], k=3)  # the space's snapshot is cached
    real = getattr(search, when)
    calls = []

    def cancelled_meanwhile(*args: object, **kwargs: object) -> object:
        if not calls:
            calls.append(upgrade.cancel(ctx, job_id))
        return real(*args, **kwargs)

    monkeypatch.setattr(search, when, cancelled_meanwhile)
    res = search.search(ctx, "g", texts=[it.text for it in ITEMS + MORE], k=1)
    assert res.plan == "single" and [row[0].item for row in res.hits] == EVERY
    assert not list(vectors.glob("*-job*"))


def test_a_mapped_space_missing_while_its_job_serves_is_an_error(ctx: Context) -> None:
    job_id = mapped_job(ctx)
    upgrade.prepare(ctx, job_id)
    (space,) = (galleries.gallery_dir(ctx, "g") / "vectors").glob("*-job*")
    shutil.rmtree(space)  # an operator's mistake, or a lost disk
    with pytest.raises(CorruptArtifact, match="mapped space of upgrade job .* is missing"):
        search.search(ctx, "g", texts=["w1"], k=3)
    assert not space.exists()
    upgrade.rollback(ctx, job_id)
    assert found(ctx) == EVERY


@pytest.mark.parametrize("stop", ["cancel", "rollback"])
def test_a_job_stopped_mid_map_writes_no_more_of_its_space(ctx: Context, stop: str) -> None:
    """Cancelled or rolled back while gated with half its chunks mapped: the runner's next
    batches write nothing, the space is gone and stays gone, the old version serves."""
    job_id = mapped_job(ctx)
    (seqs,) = upgrade.map_batches(ctx, job_id)
    assert upgrade.map_chunks(ctx, job_id, seqs[:2]) > 0
    assert upgrade.get_job(ctx, job_id).report["map"]["mapped"] > 0  # progress, mid-map
    assert getattr(upgrade, stop)(ctx, job_id).state in ("cancelled", "rolled_back")
    assert upgrade.map_chunks(ctx, job_id, seqs[2:]) == 0
    assert upgrade.publish_mapped(ctx, job_id) is None
    assert not list((galleries.gallery_dir(ctx, "g") / "vectors").glob("*-job*"))
    assert found(ctx) == EVERY


def test_a_job_served_before_its_map_finishes_mapping(ctx: Context) -> None:
    """A job gated before mapped plans waited for their map (serving_bridge, space half
    written) is mapped to the end by the next run and records its map done once."""
    job_id = mapped_job(ctx)
    (seqs,) = upgrade.map_batches(ctx, job_id)
    upgrade.map_chunks(ctx, job_id, seqs[:1])
    with ctx.session(write=True) as s:  # as the earlier gate left it
        job = s.get(upgrade.states.Job, job_id)
        upgrade.states.start_serving(s, job)
    assert upgrade.prepare(ctx, job_id)  # chunks left to backfill
    rec = upgrade.get_job(ctx, job_id)
    assert rec.state == JobState.BACKFILLING and rec.report["map"]["done"]
    assert rec.report["map"]["mapped"] == len(ITEMS + MORE)
    assert found(ctx) == EVERY
    assert upgrade.map_batches(ctx, job_id) == []
