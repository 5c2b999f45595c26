"""Compatible training of a sentence-transformer, end to end through the service: a
trained v2 is registered with lineage, an upgrade of v1's gallery serves `basis` from
the first query with nothing re-embedded, and v2 queries find more than v1's did."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from embcompat.datasets import wordnet_pairs
from embcompat.errors import DuplicateVersion, InvalidInput
from embcompat.registry import versions
from embcompat.registry.shipped import MINILM_L6, shipped_model_path
from embcompat.service import galleries, training, upgrade
from embcompat.service.context import Context
from embcompat.service.search import search
from embcompat.training.text import (
    CompatibleLoss,
    TextPairs,
    TextTrainConfig,
    pairs_from_texts,
    train_compatible,
)
from tests.conftest import wordnet_items


@pytest.fixture(scope="module")
def base(models_dir: Path) -> Any:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(shipped_model_path(MINILM_L6, models_dir)), device="cpu")


def _pairs(n: int, dim: int = 8, seed: int = 0) -> TextPairs:
    rows = wordnet_pairs([], n, seed=seed)
    q, d, of = pairs_from_texts(rows)
    old = np.random.default_rng(seed).standard_normal((len(d), dim)).astype(np.float32)
    return TextPairs(q, d, of, old)


def test_pairs_refuse_empty_texts_and_hold_out_whole_documents() -> None:
    with pytest.raises(InvalidInput, match="training pair 1 must be two non-empty texts"):
        pairs_from_texts([("a query", "a doc"), ("", "doc")])
    with pytest.raises(InvalidInput, match="no training pairs"):
        pairs_from_texts([])
    q, d, of = pairs_from_texts([("q1", "A"), ("q2", "B"), ("q3", "A")])
    assert d == ["A", "B"] and of.tolist() == [0, 1, 0]
    pairs = _pairs(300)
    train, val = pairs.split(0.2, seed=1)
    assert not set(train.documents) & set(val.documents)
    assert len(train.queries) + len(val.queries) == len(pairs.queries)
    for part in (train, val):  # each query still points at its own document and v1 vector
        for i in range(len(part.queries)):
            j = pairs.queries.index(part.queries[i])
            assert part.documents[part.doc_of[i]] == pairs.documents[pairs.doc_of[j]]
            k = pairs.documents.index(part.documents[part.doc_of[i]])
            assert np.array_equal(part.old_docs[part.doc_of[i]], pairs.old_docs[k])


def test_config_names_the_bad_setting() -> None:
    for bad, match in (
        ({"method": "magic"}, "unknown compatible training method"),
        ({"weights": {"new": 1.0, "bogus": 1.0}}, "unknown loss terms"),
        ({"weights": {"new": 0, "influence": 0, "contrast": 0, "align": 0}}, "not all zero"),
        ({"weights": {"new": float("nan")}}, "finite"),
        ({"batch_size": 1}, "batch_size"),
        ({"extra_dims": -1}, "extra_dims"),
        ({"method": "independent", "extra_dims": 8}, "no head"),
    ):
        with pytest.raises(InvalidInput, match=match):
            TextTrainConfig(**bad).check()  # type: ignore[arg-type]


def test_influence_loss_is_lowest_when_queries_point_at_their_own_v1_document() -> None:
    """The BCT term scores a query's head against v1's vector of every training document:
    aligned heads beat shuffled ones."""
    old = np.eye(6, dtype=np.float32)

    class Fixed(torch.nn.Module):
        def __init__(self, rows: torch.Tensor) -> None:
            super().__init__()
            self.rows = rows

        def forward(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {"sentence_embedding": self.rows[features["ids"]]}

    labels = torch.arange(6)
    good = Fixed(torch.eye(6))
    bad = Fixed(torch.eye(6)[torch.tensor([1, 2, 3, 4, 5, 0])])
    features = [{"ids": labels}, {"ids": labels}]
    for term in ("influence", "contrast", "align"):
        w = {term: 1.0}
        lo = CompatibleLoss(good, old, w)(features, labels).item()
        hi = CompatibleLoss(bad, old, w)(features, labels).item()
        assert lo < hi, term


def test_training_is_deterministic_for_a_seed_and_keeps_v1_space_first(base: Any) -> None:
    pairs = _pairs(64, dim=384)
    config = TextTrainConfig(method="bt2", extra_dims=16, batch_size=16, progress=False)
    a = train_compatible(base, pairs, config)
    b = train_compatible(base, pairs, config)
    texts = pairs.queries[:5]
    ea, eb = a.model.encode(texts), b.model.encode(texts)
    assert a.dim == 400 and ea.shape == (5, 400)
    assert np.array_equal(ea, eb)
    assert a.history and "eval_heldout_new_old_r10" in a.history[0]
    assert not np.array_equal(base.encode(texts), ea[:, :384])  # base is left untouched


def test_a_stopped_run_resumes_from_its_checkpoint(base: Any, tmp_path: Path) -> None:
    """A run stopped after its first epoch (its checkpoint written), run again with the
    same settings, ends at the weights of a run that never stopped."""
    from transformers import TrainerCallback

    class StopAfterOneEpoch(TrainerCallback):  # type: ignore[misc]
        def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            control.should_training_stop = True

    pairs = _pairs(64, dim=384)

    def cfg(where: Path) -> TextTrainConfig:
        return TextTrainConfig(
            method="bct", epochs=2, batch_size=16, progress=False, patience=5, checkpoint_dir=where
        )

    whole = train_compatible(base, pairs, cfg(tmp_path / "whole"))
    stopped = train_compatible(base, pairs, cfg(tmp_path / "split"), [StopAfterOneEpoch()])
    assert len(stopped.history) == 1
    resumed = train_compatible(base, pairs, cfg(tmp_path / "split"))
    texts = pairs.queries[:4]
    assert np.allclose(whole.model.encode(texts), resumed.model.encode(texts), atol=1e-5)
    assert [h["epoch"] for h in resumed.history] == [1.0, 2.0]


def _recall(ctx: Context, gallery: str, queries: list[str], relevant: list[str]) -> float:
    """R@10 through the service's search (no read-through: nothing gets re-embedded)."""
    hits = search(ctx, gallery, texts=queries, k=10, read_through=False).hits
    return float(
        np.mean([r in [h.item for h in row] for r, row in zip(relevant, hits, strict=True)])
    )


def test_compatible_v2_serves_basis_from_the_first_query_and_beats_v1(
    text_ctx: Context, tmp_path: Path
) -> None:
    """The issue's end-to-end: a few hundred pairs, one epoch, through the service."""
    ctx = text_ctx
    items, queries, relevant = wordnet_items(800, seed=11)
    galleries.create_gallery(ctx, "kb", "text", "v1")
    galleries.ingest(ctx, "kb", items)
    wanted = [items[r].id for r in relevant]
    v1_r10 = _recall(ctx, "kb", queries, wanted)
    store = galleries.space_store(ctx, "kb", _record(ctx, "v1"))
    ids = store.snapshot().sorted_ids
    before = store.get(ids)[0]

    rows = wordnet_pairs([i.id for i in items], 384, seed=5)
    run_id = training.request_training(
        ctx, old="text:v1", version="v1c", base=MINILM_L6, pairs=rows, method="bt2",
        extra_dims=64, batch_size=32,
    )  # fmt: skip
    out = training.run_training(ctx, run_id)
    assert out["state"] == "done" and out["result"]["registered"] == "text:v1c"
    assert out["progress"]["steps_done"] == out["progress"]["steps_total"] > 0
    rec = _record(ctx, "v1c")
    assert rec.parent == "v1" and rec.dim == 384 + 64
    assert rec.tags["compatible_with"] == "text:v1" and rec.tags["method"] == "bt2"
    assert rec.tags["extra_dims"] == "64"
    mv = ctx.registry.get_version("text", rec.mlflow_version)  # type: ignore[arg-type]
    assert mv.tags["compatible_with"] == "text:v1"
    assert training.run_training(ctx, run_id)["result"] == out["result"]  # idempotent

    job = upgrade.start_upgrade(ctx, "kb", "text", "v1c", plan="auto")
    state = upgrade.run_in_process(ctx, job.id, stop_after=0)  # served, before any backfill
    assert (state.state, state.plan) == ("backfilling", "basis")
    assert state.report["bridge"]["kind"] == "none"  # no adapter fitted, no pairs encoded
    assert search(ctx, "kb", texts=queries[:1], k=10, read_through=False).plan == "basis"
    v2_r10 = _recall(ctx, "kb", queries, wanted)
    per_version = galleries.stats(ctx, "kb")["items_per_version"]
    assert per_version["v1"] == 800 and per_version.get("v1c", 0) == 0  # nothing re-embedded
    after = galleries.space_store(ctx, "kb", _record(ctx, "v1")).get(ids)[0]
    assert len(ids) == 800 and np.array_equal(before, after)
    print(f"R@10 on v1's gallery: v1 queries {v1_r10:.3f}, compatible v2 queries {v2_r10:.3f}")
    assert v2_r10 >= v1_r10, (v2_r10, v1_r10)


def _record(ctx: Context, version: str) -> Any:
    with ctx.session() as s:
        return versions.get_version(s, ctx.registry, "text", version)


def test_requests_are_checked_before_anything_is_stored(text_ctx: Context) -> None:
    ctx = text_ctx
    rows = [("a query here", f"doc {i}") for i in range(200)]
    with pytest.raises(InvalidInput, match="not both"):
        training.request_training(ctx, old="text:v1", version="x", pairs=rows, gallery="g")
    with pytest.raises(InvalidInput, match="version name '../x' is not allowed"):
        training.request_training(ctx, old="text:v1", version="../x", pairs=rows)
    with pytest.raises(InvalidInput, match="MODEL:VERSION"):
        training.request_training(ctx, old="text", version="x", pairs=rows)
    with pytest.raises(DuplicateVersion):
        training.request_training(ctx, old="text:v1", version="v2", pairs=rows)
    with pytest.raises(InvalidInput, match="too few"):
        training.request_training(ctx, old="text:v1", version="x", pairs=rows[:10])
    galleries.create_gallery(ctx, "noprobe", "text", "v1")
    with pytest.raises(InvalidInput, match="stores no labelled probe"):
        training.request_training(ctx, old="text:v1", version="x", gallery="noprobe")
    with pytest.raises(InvalidInput, match="served by text:v1, not text:v2"):
        training.request_training(ctx, old="text:v2", version="x", gallery="noprobe")
    assert not (ctx.data_dir / "training").exists()
