"""Compatible-training components: orthonormal layers, the simplex, resumable training,
the basis plan's treatment of zero-padded old vectors, and refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from embcompat.adapters import BasisAdapter
from embcompat.errors import InvalidInput
from embcompat.index.faiss_index import IndexGenerations, SpaceSearcher
from embcompat.index.plans import MixedIndex, Plan
from embcompat.index.plans import search as plan_search
from embcompat.index.store import SpaceStore
from embcompat.training.components import (
    DSimplexClassifier,
    InfluenceLoss,
    OrthogonalLayer,
    alignment_loss,
)
from embcompat.training.methods import TrainedModel, train_model
from embcompat.training.trainer import TrainConfig, train


def test_orthogonal_layer_stays_orthonormal_and_preserves_inner_products() -> None:
    torch.manual_seed(0)
    layer = OrthogonalLayer(24)
    opt = torch.optim.Adam(layer.parameters(), lr=0.05)
    target = torch.randn(64, 16)
    for _ in range(30):  # pull the head towards arbitrary targets: large updates
        f = torch.randn(64, 24)
        loss = alignment_loss(layer(f)[:, :16], target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    w = layer.matrix.detach()
    assert torch.allclose(w.T @ w, torch.eye(24), atol=1e-5)
    x, y = torch.randn(10, 24), torch.randn(10, 24)
    with torch.no_grad():
        assert torch.allclose(layer(x) @ layer(y).T, x @ y.T, atol=1e-4)


def test_dsimplex_weights_are_a_regular_simplex() -> None:
    w = DSimplexClassifier(32, 10).weight
    gram = w @ w.T
    off = gram[~torch.eye(10, dtype=torch.bool)]
    assert torch.allclose(torch.diagonal(gram), torch.ones(10), atol=1e-6)
    assert torch.allclose(off, torch.full_like(off, -1 / 9), atol=1e-6)
    assert not any(p.requires_grad for p in DSimplexClassifier(32, 10).parameters())
    with pytest.raises(InvalidInput, match="needs dim >= 9"):
        DSimplexClassifier(4, 10)


def test_influence_loss_synthesises_weights_for_new_classes() -> None:
    old_w = torch.eye(4)[:2]  # the old model knew classes 0 and 1
    loss = InfluenceLoss(old_w, [0, 1], {2: torch.tensor([0.0, 0.0, 3.0, 0.0])})
    z = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0]])
    right = loss(z, torch.tensor([0, 1, 2]))
    wrong = loss(z, torch.tensor([1, 2, 0]))
    assert float(right) < float(wrong)
    assert float(loss(z, torch.tensor([7, 7, 7]))) == 0.0  # classes it cannot score


def test_zero_padded_old_vector_scores_as_its_head_through_the_basis_plan(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    old_vecs = rng.standard_normal((20, 8)).astype(np.float32)
    new_vecs = rng.standard_normal((5, 12)).astype(np.float32)
    old_store, new_store = SpaceStore(tmp_path / "old", 8), SpaceStore(tmp_path / "new", 12)
    old_store.add(np.arange(20), old_vecs)
    new_store.add(np.arange(100, 105), new_vecs)
    index = MixedIndex(
        SpaceSearcher(old_store, IndexGenerations(tmp_path / "i-old")),
        SpaceSearcher(new_store, IndexGenerations(tmp_path / "i-new")),
    )
    basis = BasisAdapter.identity(12, 8)
    q = rng.standard_normal((3, 12)).astype(np.float32)
    res = plan_search(index, Plan("basis", basis_head=basis.head), q, None, 25)
    padded = basis.pad_old(old_vecs)
    for r in range(3):
        for item, score in zip(res.ids[r], res.scores[r], strict=True):
            want = q[r] @ (padded[item] if item < 100 else new_vecs[item - 100])
            assert score == pytest.approx(want, abs=1e-5)
            if item < 100:  # the zero-padded vector scores as its first d_old coordinates do
                assert score == pytest.approx(q[r, :8] @ old_vecs[item], abs=1e-5)
    with pytest.raises(InvalidInput, match="d_new >= d_old"):
        BasisAdapter.identity(4, 8)


class _Crash(Exception):
    pass


def _toy_run(checkpoint: Path, crash_at: int | None = None) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    x, y = torch.randn(200, 6), torch.randint(0, 3, (200,))
    epochs = {"n": 0}

    def validate() -> float:
        epochs["n"] += 1
        if crash_at is not None and epochs["n"] == crash_at:
            raise _Crash  # dies mid-run, after the earlier epochs' checkpoints
        return -float(nn.functional.cross_entropy(module(x), y))

    def loss_fn(xb: torch.Tensor, yb: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(module(xb), yb)

    cfg = TrainConfig(epochs=4, batch_size=32, patience=10, checkpoint=checkpoint, progress=False)
    train(module, loss_fn, x, y, validate, cfg)
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_training_resumes_from_its_checkpoint_to_the_same_result(tmp_path: Path) -> None:
    straight = _toy_run(tmp_path / "a.pt")
    with pytest.raises(_Crash):
        _toy_run(tmp_path / "b.pt", crash_at=3)
    resumed = _toy_run(tmp_path / "b.pt")  # picks up after epoch 2
    assert torch.load(tmp_path / "b.pt", weights_only=False)["state"]["epoch"] == 4
    for name, value in straight.items():
        assert torch.equal(value, resumed[name]), name


def _tiny_old(method: str = "independent", classifier: bool = True) -> TrainedModel:
    images = np.random.default_rng(0).integers(0, 255, (64, 28, 28), dtype=np.uint8)
    labels = np.arange(64) % 2
    model = train_model(method, images, labels, (4, 4, 4), 8, TrainConfig(epochs=1, progress=False))
    if not classifier:
        model.classifier = torch.zeros(0, 8)
    return model


def test_bad_training_requests_are_refused() -> None:
    images = np.zeros((16, 28, 28), np.uint8)
    labels = np.arange(16) % 4
    cfg = TrainConfig(epochs=1, progress=False)
    old = _tiny_old()
    with pytest.raises(InvalidInput, match="extra_dims must be >= 0, got -1"):
        train_model("bt2", images, labels, (4, 4, 4), 8, cfg, old=old, extra_dims=-1)
    with pytest.raises(InvalidInput, match="needs the old model's classifier"):
        train_model("bct", images, labels, (4, 4, 4), 8, cfg, old=_tiny_old(classifier=False))
    with pytest.raises(InvalidInput, match=r"cover the old classes; missing \[1\]"):
        train_model("bct", images, np.zeros(16, np.int64), (4, 4, 4), 8, cfg, old=old)
    with pytest.raises(InvalidInput, match="'oca' needs an old model"):
        train_model("oca", images, labels, (4, 4, 4), 8, cfg)
    with pytest.raises(InvalidInput, match="old model trained with dsimplex"):
        train_model("dsimplex", images, labels, (4, 4, 4), 16, cfg, old=old)
    with pytest.raises(InvalidInput, match="unknown training method 'lwf'"):
        train_model("lwf", images, labels, (4, 4, 4), 8, cfg)
