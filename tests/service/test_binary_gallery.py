"""A gallery served by a binary index: codes in memory, floats re-ranked from disk."""

from __future__ import annotations

import numpy as np
import pytest

from embcompat.errors import DimensionMismatch
from embcompat.registry import adapter_records
from embcompat.service import galleries, search
from embcompat.service.context import Context
from tests.conftest import vector_gallery


@pytest.fixture
def binary_gallery(ctx: Context) -> tuple[Context, np.ndarray]:
    vector_gallery(ctx, "b", 32, "binary-hnsw")
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((30, 32))
    x = centres[rng.integers(0, 30, 1000)] + 0.3 * rng.standard_normal((1000, 32))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    items = [
        galleries.ItemIn(f"i{n}", vector=v.tolist(), metadata={"even": n % 2 == 0})
        for n, v in enumerate(x)
    ]
    galleries.ingest(ctx, "b", items[:900])
    galleries.publish(ctx, "b")
    galleries.ingest(ctx, "b", items[900:])  # after the generation: searched exactly
    return ctx, x


def _ids(res: search.SearchResponse) -> np.ndarray:
    return np.array([[int(h.item[1:]) for h in hits] for hits in res.hits])


def test_binary_gallery_matches_float_search_and_registers_its_binarizer(
    binary_gallery: tuple[Context, np.ndarray],
) -> None:
    ctx, x = binary_gallery
    q = x[::50] + 0.05
    got = _ids(search.search(ctx, "b", vectors=q, k=10))
    exact = np.argsort(-(q @ x.T), axis=1)[:, :10]
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, exact, strict=True)])
    assert overlap >= 0.95, overlap
    assert (got >= 900).any()  # items added after the generation are found
    even = _ids(search.search(ctx, "b", vectors=q, k=10, filters={"even": True}))
    assert even.shape == (20, 10) and (even % 2 == 0).all()
    galleries.delete_items(ctx, "b", [f"i{n}" for n in exact[0][:3]])
    after = _ids(search.search(ctx, "b", vectors=q[:1], k=10))
    assert not set(exact[0][:3]) & set(after[0]) and after.shape == (1, 10)
    with ctx.session() as s:
        rows = [a for a in adapter_records.list_adapters(s) if a["kind"] == "itq"]
    assert len(rows) == 1 and rows[0]["direction"] == "binary: vectors->codes"
    assert rows[0]["metrics"]["nn_recall10_rerank100"] > rows[0]["metrics"]["nn_recall10_hamming"]
    _, name, number = rows[0]["mlflow_model_uri"].rsplit("/", 2)
    assert ctx.registry.get_version(name, number).tags["bits_per_dim"] == "1.0"
    galleries.publish(ctx, "b")  # the next generation keeps the same binarizer
    with ctx.session() as s:
        assert len([a for a in adapter_records.list_adapters(s) if a["kind"] == "itq"]) == 1
    with pytest.raises(DimensionMismatch, match="dim 32"):
        search.search(ctx, "b", vectors=np.zeros((1, 31), np.float32))


def test_corrupt_binary_generation_falls_back_to_exact_search(
    binary_gallery: tuple[Context, np.ndarray],
) -> None:
    ctx, x = binary_gallery
    (index_file,) = (galleries.gallery_dir(ctx, "b") / "indexes").glob("*/gen-*/binary.faiss")
    index_file.write_bytes(b"\0" * 100)
    res = search.search(ctx, "b", vectors=x[:3], k=5)
    assert _ids(res)[:, 0].tolist() == [0, 1, 2]  # exact answers from the store
