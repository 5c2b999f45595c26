"""Train an old model, or a new model compatible with an old one, by method name.

Methods (the `method` argument of `train_model`):
- `independent`: the new model on its own (cosine classifier); the reference for the
  price of compatibility, and the case the compatibility criterion must reject.
- `bct`: + InfluenceLoss of the old classifier on the new embedding (same dim as old).
- `bt2`: features of size d_old + extra through an orthonormal basis transformation;
  on the first d_old coordinates the influence loss, their alignment to the old
  features, and the cross-model contrastive loss (influence alone is too weak here).
- `oca`: features of size d_old + extra, the new classifier on the features themselves
  (the model keeps its geometry), an orthogonal layer whose first d_old outputs are
  aligned to the old features (alignment + cross-model contrastive, no old classifier).
- `dsimplex`: old and new both trained against one fixed d-Simplex classifier; the new
  model never sees the old one. Its old model must be trained with `dsimplex` too.
Served vectors are L2-normalised; an old vector enters the new space zero-padded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from embcompat.errors import InvalidInput
from embcompat.training.components import (
    CosineClassifier,
    DSimplexClassifier,
    InfluenceLoss,
    OrthogonalLayer,
    alignment_loss,
    cross_model_contrastive,
)
from embcompat.training.fashion import to_tensor_batch
from embcompat.training.nets import ConvEmbedder
from embcompat.training.trainer import TrainConfig, TrainResult, train

METHODS = ("independent", "bct", "bt2", "oca", "dsimplex")
EXTRA_DIM_METHODS = ("bt2", "oca")
SIMPLEX_CLASSES = 10
# Loss weights per method. Measured on the protocol (4 epochs, 22k images): influence
# and alignment alone leave new/old at or under old/old; the cross-model contrastive term
# is what lifts it above (BT² v1->v2 new/old 0.745 -> 0.802 against old/old 0.778).
DEFAULT_WEIGHTS: dict[str, dict[str, float]] = {
    "bct": {"influence": 1.0},
    "bt2": {"influence": 1.0, "align": 1.0, "contrast": 1.0},
    "oca": {"align": 1.0, "contrast": 1.0},
}  # the fixed classifier reserves a vertex for every class to come


class CompatNet(nn.Module):
    """backbone → features f (dim) → optional orthogonal layer → embedding z."""

    def __init__(self, channels: Sequence[int], dim: int, orthogonal: bool) -> None:
        super().__init__()
        self.backbone = ConvEmbedder(channels, dim)
        self.transform: nn.Module = OrthogonalLayer(dim) if orthogonal else nn.Identity()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.backbone(x)
        return self.transform(f), f


@dataclass
class TrainedModel:
    """A trained embedding model and what a later compatible model needs from it."""

    net: CompatNet
    method: str
    classes: list[int]
    classifier: torch.Tensor  # (classes, dim) class directions in the embedding space
    channels: list[int]
    dim: int
    extra_dims: int = 0
    result: TrainResult | None = None

    @torch.no_grad()
    def embed(self, images: npt.NDArray[Any], batch_size: int = 1024) -> npt.NDArray[np.float32]:
        """images (n, 28, 28) uint8 → (n, dim) L2-normalised float32 embeddings."""
        self.net.eval()
        out = []
        for s in range(0, len(images), batch_size):
            x = torch.from_numpy(to_tensor_batch(images[s : s + batch_size]))
            out.append(nn.functional.normalize(self.net(x)[0], dim=1).numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)


def _check(method: str, old: TrainedModel | None, classes: list[int], extra_dims: int) -> None:
    if method not in METHODS:
        raise InvalidInput(
            f"unknown training method {method!r}", hint=f"one of {', '.join(METHODS)}"
        )
    if extra_dims < 0:
        raise InvalidInput(f"extra_dims must be >= 0, got {extra_dims}", field="extra_dims")
    if method in ("bct", "bt2", "oca") and old is None:
        raise InvalidInput(f"method {method!r} needs an old model (its classifier or features)")
    if method in ("bct", "bt2") and old is not None and old.classifier.numel() == 0:
        raise InvalidInput(
            f"method {method!r} needs the old model's classifier; the old model has none",
            hint="train the old model with a classifier, or use oca (feature alignment)",
        )
    if method == "bct" and old is not None and not set(old.classes) <= set(classes):
        missing = sorted(set(old.classes) - set(classes))
        raise InvalidInput(
            f"bct needs the new training set to cover the old classes; missing {missing}",
            field="classes",
        )
    if method == "dsimplex" and old is not None and old.method != "dsimplex":
        raise InvalidInput(
            f"dsimplex compatibility needs an old model trained with dsimplex, not {old.method!r}"
        )


def train_model(
    method: str,
    images: npt.NDArray[np.uint8],
    labels: npt.NDArray[np.int64],
    channels: Sequence[int],
    dim: int,
    config: TrainConfig,
    old: TrainedModel | None = None,
    extra_dims: int = 0,
    val: tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]] | None = None,
    weights: dict[str, float] | None = None,
) -> TrainedModel:
    """Train one model with `method` on (images, labels); `old` is the frozen model to be
    compatible with (None for a first model). For bt2/oca the embedding has
    old.dim + extra_dims dimensions and `dim` is ignored."""
    classes = sorted(int(c) for c in np.unique(labels))
    _check(method, old, classes, extra_dims)
    w = {**DEFAULT_WEIGHTS.get(method, {}), **(weights or {})}
    if method in EXTRA_DIM_METHODS:
        assert old is not None
        dim = old.dim + extra_dims
    elif method in ("bct",) and old is not None:
        dim = old.dim
    torch.manual_seed(config.seed)
    net = CompatNet(channels, dim, orthogonal=method in EXTRA_DIM_METHODS)
    head: nn.Module = (
        DSimplexClassifier(dim, SIMPLEX_CLASSES)
        if method == "dsimplex"
        else CosineClassifier(dim, max(classes) + 1)
    )
    module = nn.ModuleDict({"net": net, "head": head})
    x = torch.from_numpy(to_tensor_batch(images))
    y = torch.from_numpy(labels)

    old_feats: torch.Tensor | None = None
    influence: InfluenceLoss | None = None
    if old is not None and method in ("bct", "bt2", "oca"):
        old_feats = torch.from_numpy(old.embed(images))
        if method in ("bct", "bt2"):
            means = {c: old_feats[y == c].mean(0) for c in classes if c not in old.classes}
            influence = InfluenceLoss(old.classifier, old.classes, means)

    def loss_fn(xb: torch.Tensor, yb: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        z, f = net(xb)
        loss = nn.functional.cross_entropy(head(f if method == "oca" else z), yb)
        if old is not None and old_feats is not None:
            z_head = z[:, : old.dim]
            if influence is not None and w.get("influence"):
                loss = loss + w["influence"] * influence(z_head, yb)
            if w.get("align"):
                loss = loss + w["align"] * alignment_loss(z_head, old_feats[idx])
            if w.get("contrast"):
                loss = loss + w["contrast"] * cross_model_contrastive(z_head, old_feats[idx], yb)
        return loss

    vx, vy = val if val is not None else (images[:0], labels[:0])
    vxt = torch.from_numpy(to_tensor_batch(vx)) if len(vx) else None

    def validate() -> float:
        if vxt is None:
            return 0.0
        z, f = net(vxt)
        pred = head(f if method == "oca" else z).argmax(1).numpy()
        return float((pred == vy).mean())

    result = train(module, loss_fn, x, y, validate, config, name=f"{method} {channels}")
    with torch.no_grad():
        weight = torch.as_tensor(head.weight).detach().clone()
        if method == "oca":  # the classifier lives on f; z = W f, so its z-space rows are W w
            weight = net.transform(weight)
    return TrainedModel(
        net=net,
        method=method,
        classes=classes,
        classifier=weight[classes] if method != "dsimplex" else weight,
        channels=list(channels),
        dim=dim,
        extra_dims=extra_dims if method in EXTRA_DIM_METHODS else 0,
        result=result,
    )


def save_model(model: TrainedModel, path: Path) -> None:
    """Weights and the recipe to rebuild them, one file (torch.save), written atomically."""
    import os

    blob = {
        "state": model.net.state_dict(),
        "method": model.method,
        "classes": model.classes,
        "classifier": model.classifier,
        "channels": model.channels,
        "dim": model.dim,
        "extra_dims": model.extra_dims,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(blob, tmp)
    os.replace(tmp, path)


def load_model(path: Path) -> TrainedModel:
    blob = torch.load(path, weights_only=False)
    net = CompatNet(blob["channels"], blob["dim"], orthogonal=blob["method"] in EXTRA_DIM_METHODS)
    net.load_state_dict(blob["state"])
    net.eval()
    return TrainedModel(
        net=net,
        method=blob["method"],
        classes=blob["classes"],
        classifier=blob["classifier"],
        channels=blob["channels"],
        dim=blob["dim"],
        extra_dims=blob["extra_dims"],
    )
