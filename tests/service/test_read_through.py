"""The cascade's read-through, asynchronous: a search answers with what is known and the
items it touched are encoded after it, then found by the next searches."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from embcompat.registry import versions
from embcompat.service import galleries, search, upgrade
from embcompat.service.context import Context
from embcompat.settings import Settings
from tests.service.test_gate import TEXTS


@pytest.fixture
def ctx(hash_dir: Path, tmp_path: Path) -> Iterator[Context]:
    """A hash:v1 gallery upgrading to hash:v2, serving the cascade with an asynchronous
    read-through (the backfill not started)."""
    shutil.copytree(hash_dir, tmp_path / "data")
    settings = Settings(data_dir=tmp_path / "data", cascade_read_through="async")
    with Context(settings) as context:
        galleries.create_gallery(context, "g", "hash", "v1")
        galleries.ingest(context, "g", [galleries.ItemIn(f"i{n}", t) for n, t in enumerate(TEXTS)])
        job = upgrade.start_upgrade(context, "g", "hash", "v2", "auto", pairs=50)
        assert upgrade.run_in_process(context, job.id, stop_after=0).plan == "cascade"
        yield context


def test_asynchronous_read_through_answers_at_once_and_stores_what_it_touched(
    ctx: Context,
) -> None:
    """With `cascade_read_through=async` a cascade search encodes nothing before it
    answers; the candidates it would have encoded are stored by the background thread,
    and the next search finds them in the new space."""
    with ctx.session() as s:
        v2 = versions.get_version(s, ctx.registry, "hash", "v2")
    store = galleries.space_store(ctx, "g", v2)
    before = set(store.snapshot().ids.tolist())
    first = search.search(ctx, "g", texts=[TEXTS[55]], k=5)
    assert first.encodes == 0 and len(first.hits[0]) == 5
    ctx.background.submit(lambda: None).result()  # one thread: the queued work is done
    stored = set(store.snapshot().ids.tolist()) - before
    assert stored, "the touched candidates were stored after the answer"
    again = search.search(ctx, "g", texts=[TEXTS[55]], k=5)
    assert again.encodes == 0 and again.hits[0][0].item == "i55"
    assert all(h.score_new is not None for h in again.hits[0])


def test_a_queue_that_fails_loses_nothing(ctx: Context) -> None:
    """The broker down: the search still answers, with a warning that names no host, and
    the items it touched are queued by the next search once the queue works again."""

    def down(gallery: str, version_id: int, ids: list[int]) -> None:
        raise ConnectionError("redis://secret-host:6379 refused")

    queued: list[int] = []
    ctx.read_through_queue = down
    res = search.search(ctx, "g", texts=[TEXTS[55]], k=5)
    assert len(res.hits[0]) == 5 and res.warnings
    assert all("secret-host" not in w for w in res.warnings)
    ctx.read_through_queue = lambda gallery, version_id, ids: queued.extend(ids)
    search.search(ctx, "g", texts=[TEXTS[55]], k=5)
    assert queued, "the touched items were queued again"
