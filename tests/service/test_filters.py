"""Filtered search on item metadata: only matching items, k still full, clear refusals."""

from __future__ import annotations

import numpy as np
import pytest

from embcompat.errors import InvalidInput
from embcompat.index import faiss_index
from embcompat.service import galleries, search
from embcompat.service.context import Context
from tests.conftest import vector_gallery

COLORS = ("red", "green", "blue")


@pytest.fixture(params=["exact scan", "faiss selector"])
def vec_gallery(
    ctx: Context, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> tuple[Context, np.ndarray]:
    """300 items, 200 in an HNSW generation and 100 written after it. Filters are
    answered both ways: matches scanned exactly, and handed to FAISS as a selector (the
    way for sets larger than `EXACT_SCAN`, forced here by setting it to 0)."""
    if request.param == "faiss selector":
        monkeypatch.setattr(faiss_index, "EXACT_SCAN", 0)
    vector_gallery(ctx, "g", 16, "hnsw")
    vectors = np.random.default_rng(0).standard_normal((300, 16)).astype(np.float32)
    items = [
        galleries.ItemIn(f"i{n}", vector=v.tolist(), metadata={"color": COLORS[n % 3], "n": n % 5})
        for n, v in enumerate(vectors)
    ]
    galleries.ingest(ctx, "g", items[:200])
    galleries.publish(ctx, "g")  # an HNSW generation, plus 100 items added after it
    galleries.ingest(ctx, "g", items[200:])
    return ctx, vectors


def _ids(res: search.SearchResponse) -> list[list[int]]:
    return [[int(h.item[1:]) for h in hits] for hits in res.hits]


def test_filters_return_only_matching_items_and_keep_k_full(vec_gallery: tuple) -> None:
    ctx, vectors = vec_gallery
    q = vectors[:5] + 0.01
    res = search.search(ctx, "g", vectors=q, k=10, filters={"color": "red"})
    assert all(len(row) == 10 and all(n % 3 == 0 for n in row) for row in _ids(res))
    exact = np.argsort(-(q @ vectors[::3].T), axis=1)[:, :10] * 3  # red items are every 3rd
    assert [sorted(r) for r in _ids(res)] == [sorted(r) for r in exact.tolist()]
    both = search.search(ctx, "g", vectors=q, k=10, filters={"color": ["red", "blue"], "n": 2})
    for row in _ids(both):  # n % 5 == 2 and colour red or blue: 40 items, k stays 10
        assert len(row) == 10 and all(n % 5 == 2 and n % 3 in (0, 2) for n in row)
    by_id = search.search(ctx, "g", vectors=q, k=10, filters={"id": ["i7", "i250", "nope"]})
    assert [sorted(r) for r in _ids(by_id)] == [[7, 250]] * 5
    none = search.search(ctx, "g", vectors=q, k=10, filters={"color": "purple"})
    assert _ids(none) == [[]] * 5


def test_metadata_updates_and_bad_filters(vec_gallery: tuple) -> None:
    ctx, vectors = vec_gallery
    galleries.ingest(
        ctx, "g", [galleries.ItemIn("i1", vector=vectors[1].tolist(), metadata={"color": "gold"})]
    )
    res = search.search(ctx, "g", vectors=vectors[:1], k=3, filters={"color": "gold"})
    assert _ids(res) == [[1]]
    with pytest.raises(InvalidInput, match="non-empty list"):
        search.search(ctx, "g", vectors=vectors[:1], filters={"color": []})
    with pytest.raises(InvalidInput, match="unknown operator '\\$ne'"):
        search.search(ctx, "g", vectors=vectors[:1], filters={"color": {"$ne": "red"}})
    with pytest.raises(InvalidInput, match="'lt' needs a number"):
        search.search(ctx, "g", vectors=vectors[:1], filters={"n": {"lt": True}})
    with pytest.raises(InvalidInput, match="ids have no order"):
        search.search(ctx, "g", vectors=vectors[:1], filters={"id": {"gt": 3}})
    with pytest.raises(InvalidInput, match="'i9': metadata 'tags' must be a string, number"):
        galleries.ingest(
            ctx, "g", [galleries.ItemIn("i9", vector=vectors[9].tolist(), metadata={"tags": [1]})]
        )


def test_ranges_and_negation(vec_gallery: tuple) -> None:
    ctx, vectors = vec_gallery
    galleries.ingest(ctx, "g", [galleries.ItemIn("bare", vector=vectors[0].tolist())])
    q = vectors[:3] + 0.01
    res = search.search(ctx, "g", vectors=q, k=300, filters={"n": {"gte": 1, "lt": 3}})
    assert all(len(row) == 120 and {n % 5 for n in row} == {1, 2} for row in _ids(res))
    res = search.search(ctx, "g", vectors=q, k=301, filters={"color": {"not": ["red", "blue"]}})
    items = [[h.item for h in hits] for hits in res.hits]
    assert all(len(row) == 101 and "bare" in row for row in items)  # no key: not red
    assert all(int(i[1:]) % 3 == 1 for row in items for i in row if i != "bare")
    res = search.search(
        ctx, "g", vectors=q, k=300, filters={"color": "red", "n": {"not": 0, "lte": 2.5}}
    )
    assert all({(n % 3, n % 5) for n in row} <= {(0, 1), (0, 2)} for row in _ids(res))
    assert all(len(row) == 40 for row in _ids(res))
