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
from embcompat.errors import DuplicateVersion, InvalidInput, UnknownVersion
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
    with pytest.raises(InvalidInput, match="unknown loss terms"):
        training.request_training(ctx, old="text:v1", version="x", pairs=rows, weights={"x": 1})
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
    galleries.set_probe(ctx, "noprobe", [{"text": "q", "relevant": ["a", "b"]}] * 60)
    with pytest.raises(InvalidInput, match="probe holds 120 .* too few for batches of 64"):
        training.request_training(ctx, old="text:v1", version="x", gallery="noprobe")
    with pytest.raises(UnknownVersion, match="no version 'v9'"):
        training.request_training(ctx, old="text:v1", version="x", pairs=rows, base="text:v9")
    assert not (ctx.data_dir / "training").exists()


def test_new_loss_treats_a_repeated_document_as_its_own_class() -> None:
    """Several queries of one document in a batch: the in-batch term must not push a
    query away from the other copies of its own document."""
    old = np.eye(4, dtype=np.float32)

    class Fixed(torch.nn.Module):
        def forward(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {"sentence_embedding": torch.eye(4)[features["ids"]]}

    labels = torch.tensor([0, 0, 1, 2])  # queries 0 and 1 share document 0
    features = [{"ids": labels}, {"ids": labels}]
    for term in ("new", "contrast"):
        assert CompatibleLoss(Fixed(), old, {term: 1.0})(features, labels).item() < 1e-3, term


def test_held_out_recall_agrees_with_brute_force() -> None:
    from embcompat.training import text

    rng = np.random.default_rng(0)
    q, g = rng.standard_normal((50, 8)), rng.standard_normal((200, 8))
    relevant = rng.integers(0, 200, 50)
    scores = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (
        g / np.linalg.norm(g, axis=1, keepdims=True)
    ).T
    rank = (scores > scores[np.arange(50), relevant][:, None]).sum(1)
    assert text.recall_at_10(q, g, relevant) == pytest.approx(float((rank < 10).mean()))


def test_a_split_that_leaves_no_batch_or_no_held_out_pair_is_refused() -> None:
    """Pairs whose documents repeat: one document with most queries, held out, would
    leave nothing to train on; refused before any model is touched."""
    rows = [(f"query {i}", "the one document") for i in range(120)]
    rows += [(f"other {i}", f"doc {i}") for i in range(9)]
    q, d, of = pairs_from_texts(rows)
    pairs = TextPairs(q, d, of, np.ones((len(d), 4), np.float32))
    train, val = pairs.split(0.1, seed=8)
    assert len(train.queries) == 9 and len(val.queries) == 120  # seed 8 holds it out
    with pytest.raises(InvalidInput, match="9 training and 120 held-out pairs"):
        train_compatible(None, pairs, TextTrainConfig(batch_size=64, seed=8, progress=False))
    two = TextPairs(q[:128], ["a", "b"], np.arange(128) % 2, np.ones((2, 4), np.float32))
    with pytest.raises(InvalidInput, match="of the 2 distinct documents leaves 128 training"):
        train_compatible(None, two, TextTrainConfig(batch_size=64, progress=False))


def test_checkpoints_of_other_inputs_are_never_resumed(tmp_path: Path) -> None:
    """A checkpoint folder left by a run over other pairs (a run id reused after a
    database restore, a probe edited before the resume) is cleared, not resumed."""
    from embcompat.training.text import _resume_point

    def checkpoint(step: int) -> None:
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")

    checkpoint(8)  # written before checkpoints were stamped: not known to be ours
    assert _resume_point(tmp_path, "a") is None and not (tmp_path / "checkpoint-8").exists()
    checkpoint(16)
    assert _resume_point(tmp_path, "a") == tmp_path / "checkpoint-16"
    assert _resume_point(tmp_path, "b") is None and not list(tmp_path.glob("checkpoint-*"))


def test_a_failed_run_reports_no_server_path(text_ctx: Context) -> None:
    """A run whose error is not ours shows its type only: its text names server paths."""
    ctx = text_ctx
    rows = [(f"query {i}", f"doc {i}") for i in range(200)]
    run_id = training.request_training(ctx, old="text:v1", version="x", pairs=rows)
    (ctx.data_dir / "training" / str(run_id) / "pairs.json").unlink()
    with pytest.raises(FileNotFoundError):
        training.run_training(ctx, run_id)
    run = training.get_training(ctx, run_id)
    assert run["state"] == "failed" and run["finished_at"] is not None
    assert run["error"].startswith("internal_error: FileNotFoundError")
    assert str(ctx.data_dir) not in run["error"]


def test_a_run_whose_pairs_cannot_be_written_is_not_recorded(text_ctx: Context) -> None:
    from embcompat.registry.schema import TrainingRun

    ctx = text_ctx
    (ctx.data_dir / "training").write_text("a file where the runs' folder should be")
    rows = [(f"query {i}", f"doc {i}") for i in range(200)]
    with pytest.raises(OSError):
        training.request_training(ctx, old="text:v1", version="x", pairs=rows)
    with ctx.session() as s:
        assert s.query(TrainingRun).count() == 0


def test_a_probe_over_more_items_than_a_statement_takes_is_read_in_parts(
    text_ctx: Context,
) -> None:
    """SQLite takes 250,000 parameters a statement (PostgreSQL 65,535): a probe naming
    more items is read in parts, and fails for what it is (no item with text), not as
    an unreachable database (which is retried)."""
    ctx = text_ctx
    galleries.create_gallery(ctx, "big", "text", "v1")
    galleries.set_probe(ctx, "big", [{"text": "q", "relevant": [f"i{n}" for n in range(260_000)]}])
    run_id = training.request_training(ctx, old="text:v1", version="x", gallery="big")
    with pytest.raises(InvalidInput, match="has a relevant item with stored text"):
        training.run_training(ctx, run_id)
    assert training.get_training(ctx, run_id)["error"].startswith("invalid_input: no probe")


def test_a_run_held_by_a_live_process_is_left_to_it_until_its_lease_lapses(
    text_ctx: Context,
) -> None:
    from datetime import UTC, datetime, timedelta

    from embcompat.registry.schema import TrainingRun

    ctx = text_ctx
    lease = ctx.settings.training_lease_s
    run_id = training.request_training(
        ctx, old="text:v1", version="v1x", pairs=wordnet_pairs([], 200, seed=2)
    )
    assert training.lapsed_runs(ctx) == []  # just requested: its dispatch is on its way

    def beat(ago_s: float) -> None:
        with ctx.session(write=True) as s:
            run = s.get(TrainingRun, run_id)
            assert run is not None
            run.state, run.heartbeat_at = "running", datetime.now(UTC) - timedelta(seconds=ago_s)

    beat(1)
    held = training.run_training(ctx, run_id)  # a redelivered copy: returns at once
    assert held["state"] == "running" and held["lapsed"] is False
    assert training.lapsed_runs(ctx) == []
    beat(lease + 1)
    assert training.get_training(ctx, run_id)["lapsed"] is True
    assert training.lapsed_runs(ctx) == [run_id]
    assert training.lapsed_runs(ctx) == []  # re-sent at most once per lease


def test_v1_document_vectors_are_encoded_once_per_run_and_a_damaged_cache_is_redone(
    text_ctx: Context,
) -> None:
    ctx = text_ctx
    run_id = training.request_training(
        ctx, old="text:v1", version="v1y", pairs=wordnet_pairs([], 200, seed=4)
    )
    v1 = _record(ctx, "v1")
    first = training._file_pairs(ctx, run_id, v1)
    cached = ctx.data_dir / "training" / str(run_id) / "v1-documents.npy"
    assert np.array_equal(np.load(cached), first.old_docs)
    np.save(cached, first.old_docs * 2)  # a resumed run reads what was stored, not v1
    assert np.array_equal(training._file_pairs(ctx, run_id, v1).old_docs, first.old_docs * 2)
    cached.write_bytes(b"not an array")
    assert np.allclose(training._file_pairs(ctx, run_id, v1).old_docs, first.old_docs, atol=1e-5)
