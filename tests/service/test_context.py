"""The warm state of the service lives on its `Context`: two contexts share nothing, and
closing one releases its pool, engine and caches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from numpy._core import multiarray

from embcompat.service import galleries, search
from embcompat.service.context import Context
from embcompat.settings import Settings
from tests.conftest import vector_gallery


def test_two_contexts_keep_their_own_stores_searchers_and_caches(ctx: Context) -> None:
    vector_gallery(ctx, "g", 4)
    x = np.eye(4, dtype=np.float32)
    galleries.ingest(ctx, "g", [galleries.ItemIn(f"i{i}", vector=x[i].tolist()) for i in range(4)])
    with ctx.session() as s:
        rec = galleries.version_record(ctx, s, 1)
    other = Context(Settings(data_dir=ctx.data_dir))
    try:
        assert galleries.space_store(ctx, "g", rec) is galleries.space_store(ctx, "g", rec)
        assert galleries.space_store(other, "g", rec) is not galleries.space_store(ctx, "g", rec)
        s1 = galleries.space_searcher(ctx, "g", rec)
        assert galleries.space_searcher(ctx, "g", rec) is s1
        assert galleries.space_searcher(other, "g", rec) is not s1
        # both see the same data on disk all the same
        hits = search.search(other, "g", vectors=x[2:3], k=1).hits
        assert hits[0][0].item == "i2"
        built = []
        assert ctx.cached("x", 1, lambda: built.append(1) or "v") == "v"
        assert ctx.cached("x", 1, lambda: built.append(1) or "w") == "v" and built == [1]
        assert other.cached("x", 1, lambda: "w") == "w"
    finally:
        other.close()


def test_close_releases_the_pool_and_caches_then_rebuilds_on_use(tmp_path: Path) -> None:
    ctx = Context(Settings(data_dir=tmp_path / "data"))
    pool = ctx.search_pool
    assert pool.submit(lambda: 1 + 1).result() == 2
    ctx.cached("x", 1, lambda: "v")
    ctx.close()
    assert pool._shutdown  # the threads are gone with the context
    assert ctx.search_pool is not pool
    assert ctx.cached("x", 1, lambda: "w") == "w"
    ctx.close()


def test_a_context_sets_numpy_huge_pages_as_its_settings_say(tmp_path: Path) -> None:
    """Off by default: fresh arrays then never wait on the kernel compacting memory."""
    was = multiarray._set_madvise_hugepage(False)
    try:
        for wanted in (True, False):
            with Context(Settings(data_dir=tmp_path, numpy_hugepages=wanted)):
                # the setter returns the setting it replaces: what the context set
                assert multiarray._set_madvise_hugepage(not wanted) is wanted
        with Context(Settings(data_dir=tmp_path)):
            assert multiarray._set_madvise_hugepage(True) is False
    finally:
        multiarray._set_madvise_hugepage(was)
