"""Reusable pieces of compatible training, each from its paper's method section.

- `CosineClassifier`: logits = s · cos(z, w_c); the classifiers below and the old
  model's classifier all score by angle, so a vector's norm never buys compatibility.
- `InfluenceLoss` (BCT, Shen et al. CVPR'20): the frozen old classifier applied to the
  new embedding. Classes the old model never saw get the mean of the old model's
  features for that class as their weight (BCT's synthesised classifier), so the loss
  covers every class of the new training set.
- `OrthogonalLayer`: z = W f with W orthogonal by parametrisation
  (`torch.nn.utils.parametrizations.orthogonal`): inner products are preserved, so the
  new model keeps its own geometry. With extra dimensions (f of size d_old + extra),
  it is BT²'s basis transformation (Zhou et al. CVPR'23) and OCA's orthogonal layer
  (Ricci et al. 2024): the first d_old coordinates are trained to be compatible with the
  old space, old vectors are zero-padded, and the extra coordinates carry what is new.
- `alignment_loss` (OCA): 1 − cos between the first d_old coordinates and the frozen old
  model's feature of the same image.
- `cross_model_contrastive`: new heads against the old features of the batch, same class
  as positives: the objective that new-to-old retrieval measures.
- `DSimplexClassifier` (stationary representations, Biondi et al. CVPR'24): fixed weights
  at the vertices of a regular simplex; models trained against the same simplex share
  their class directions without ever seeing each other.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn.utils.parametrizations import orthogonal

from embcompat.errors import InvalidInput


class CosineClassifier(nn.Module):
    def __init__(self, dim: int, classes: int, scale: float = 16.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(classes, dim) / dim**0.5)
        self.scale = scale

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return (
            self.scale
            * nn.functional.normalize(z, dim=1)
            @ nn.functional.normalize(self.weight, dim=1).T
        )


class DSimplexClassifier(nn.Module):
    """Fixed (not trained) weights: `classes` vertices of a regular simplex in R^dim."""

    def __init__(self, dim: int, classes: int, scale: float = 16.0) -> None:
        super().__init__()
        self.weight: torch.Tensor
        if dim < classes - 1:
            raise InvalidInput(
                f"a d-Simplex of {classes} classes needs dim >= {classes - 1}, got {dim}"
            )
        self.register_buffer("weight", simplex_vertices(classes, dim))
        self.scale = scale

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.scale * nn.functional.normalize(z, dim=1) @ self.weight.T


def simplex_vertices(classes: int, dim: int) -> torch.Tensor:
    """(classes, dim) unit vectors with pairwise cosine −1/(classes−1): the centred
    standard basis of R^classes, mapped isometrically into R^dim (first classes−1 axes)."""
    centred = np.eye(classes) - 1.0 / classes
    u, s, _ = np.linalg.svd(centred)
    coords = centred @ u[:, : classes - 1]  # isometric: the centred basis spans classes−1 dims
    out = np.zeros((classes, dim))
    out[:, : classes - 1] = coords / np.linalg.norm(coords, axis=1, keepdims=True)
    return torch.tensor(out, dtype=torch.float32)


class InfluenceLoss(nn.Module):
    """BCT: cross-entropy of the frozen old classifier on (the head of) new embeddings."""

    def __init__(
        self,
        old_weight: torch.Tensor,
        old_classes: list[int],
        new_class_means: dict[int, torch.Tensor] | None = None,
        scale: float = 16.0,
    ) -> None:
        super().__init__()
        extra = new_class_means or {}
        classes = sorted({*old_classes, *extra})
        rows = []
        for c in classes:
            if c in old_classes:
                rows.append(old_weight[old_classes.index(c)])
            else:
                rows.append(extra[c])
        self.weight: torch.Tensor
        self.label_map: torch.Tensor
        self.register_buffer("weight", nn.functional.normalize(torch.stack(rows).detach(), dim=1))
        label_map = torch.full((max(classes) + 1,), -1, dtype=torch.long)
        label_map[torch.tensor(classes)] = torch.arange(len(classes))
        self.register_buffer("label_map", label_map)
        self.scale = scale

    def forward(self, z_head: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        mapped = self.label_map[labels.clamp(max=len(self.label_map) - 1)]
        keep = (labels < len(self.label_map)) & (mapped >= 0)
        if not keep.any():
            return z_head.sum() * 0.0
        logits = self.scale * nn.functional.normalize(z_head[keep], dim=1) @ self.weight.T
        return nn.functional.cross_entropy(logits, mapped[keep])


class OrthogonalLayer(nn.Module):
    """z = f Wᵀ with W (dim, dim) orthogonal at every step (Householder/exp param)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = orthogonal(nn.Linear(dim, dim, bias=False))

    @property
    def matrix(self) -> torch.Tensor:
        return torch.as_tensor(self.linear.weight)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.linear(f)


def cross_model_contrastive(
    z_head: torch.Tensor, old_features: torch.Tensor, labels: torch.Tensor, tau: float = 0.1
) -> torch.Tensor:
    """The cross-model retrieval objective itself: each new embedding's head must score
    the old features of its own class (in the batch) above those of other classes,
    i.e. new queries must find their class in an old gallery (supervised contrastive,
    old side frozen)."""
    logits = (
        nn.functional.normalize(z_head, dim=1)
        @ nn.functional.normalize(old_features, dim=1).T
        / tau
    )
    same = (labels[:, None] == labels[None, :]).float()
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    return -((log_prob * same).sum(1) / same.sum(1).clamp(min=1)).mean()


def alignment_loss(z_head: torch.Tensor, old_features: torch.Tensor) -> torch.Tensor:
    """OCA's alignment: 1 − cos(first d_old coordinates of new, old feature), averaged."""
    return (1 - nn.functional.cosine_similarity(z_head, old_features, dim=1)).mean()
