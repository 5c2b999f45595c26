"""Residual MLP bridge (Drift-Adapter's MLP): f(x) = x·W + b + MLP(x), L2-normalised.

W, b start from the ridge affine solution and the MLP's last layer starts at zero, so
training begins at the affine bridge and only moves where the loss improves. The loss
is an in-batch contrastive term (each mapped source must pick its own target among the
batch, temperature τ) plus a cosine term; training stops early on a held-out split.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.special import erf

from embcompat.adapters.base import Adapter, Direction, check_pairs
from embcompat.adapters.linear import AffineAdapter
from embcompat.arrays import FloatArray, l2_normalize
from embcompat.errors import InvalidInput


def _gelu(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    return (0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))).astype(np.float32)


class ResidualMLPAdapter(Adapter):
    kind = "residual_mlp"

    @classmethod
    def fit(
        cls,
        source: Any,
        target: Any,
        direction: Direction = "query: new->old",
        hidden: int = 256,
        max_steps: int = 400,
        eval_every: int = 40,
        batch_size: int = 256,
        lr: float = 1e-3,
        temperature: float = 0.05,
        cosine_weight: float = 1.0,
        holdout: float = 0.1,
        patience: int = 3,
        seed: int = 0,
    ) -> ResidualMLPAdapter:
        import torch
        from torch import nn

        x, y = check_pairs(source, target, "residual_mlp")
        if max_steps < 1 or eval_every < 1:
            raise InvalidInput("residual_mlp needs max_steps >= 1 and eval_every >= 1")
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(x))
        n_val = max(1, int(len(x) * holdout))
        val, train = order[:n_val], order[n_val:]
        affine = AffineAdapter.fit(x[train], y[train], direction)
        torch.manual_seed(seed)

        linear = nn.Linear(x.shape[1], y.shape[1])
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(affine.weight.T.copy()))
            linear.bias.copy_(torch.from_numpy(affine.mu_y - affine.mu_x @ affine.weight))
        last = nn.Linear(hidden, y.shape[1])
        nn.init.zeros_(last.weight)  # the residual starts at zero: training starts at affine
        nn.init.zeros_(last.bias)
        mlp = nn.Sequential(nn.Linear(x.shape[1], hidden), nn.GELU(), last)
        params = [*linear.parameters(), *mlp.parameters()]
        opt = torch.optim.Adam(params, lr=lr)
        xt, yt = torch.from_numpy(x), torch.nn.functional.normalize(torch.from_numpy(y), dim=1)

        def loss_fn(idx: torch.Tensor) -> torch.Tensor:
            out = torch.nn.functional.normalize(linear(xt[idx]) + mlp(xt[idx]), dim=1)
            logits = out @ yt[idx].T / temperature
            contrastive = nn.functional.cross_entropy(logits, torch.arange(len(idx)))
            cosine = (1 - (out * yt[idx]).sum(1)).mean()
            return contrastive + cosine_weight * cosine

        val_idx = torch.from_numpy(val)
        with torch.no_grad():
            best, bad = float(loss_fn(val_idx)), 0
        best_state = [p.detach().clone() for p in params]
        step = 0
        while step < max_steps and bad < patience:
            perm = torch.from_numpy(rng.permutation(train))
            for start in range(0, len(perm) - 1, batch_size):
                opt.zero_grad()
                loss_fn(perm[start : start + batch_size]).backward()
                opt.step()
                step += 1
                if step % eval_every and step < max_steps:
                    continue
                with torch.no_grad():
                    val_loss = float(loss_fn(val_idx))
                if val_loss < best - 1e-4:
                    best, bad = val_loss, 0
                    best_state = [p.detach().clone() for p in params]
                else:
                    bad += 1
                if step >= max_steps or bad >= patience:
                    break
        obj = cls(x.shape[1], y.shape[1], direction)
        w, b, w1, b1, w2, b2 = (p.numpy().astype(np.float32) for p in best_state)
        obj._load(
            {"hidden": hidden}, {"w": w.T, "b": b, "w1": w1.T, "b1": b1, "w2": w2.T, "b2": b2}
        )
        return obj

    def _apply(self, x: FloatArray) -> FloatArray:
        a = self._arrays
        residual = _gelu(x @ a["w1"] + a["b1"]) @ a["w2"] + a["b2"]
        return l2_normalize(x @ a["w"] + a["b"] + residual)

    def arrays(self) -> dict[str, npt.NDArray[Any]]:
        return dict(self._arrays)

    def config(self) -> dict[str, Any]:
        return {"hidden": self.hidden}

    def _load(self, config: dict[str, Any], arrays: dict[str, npt.NDArray[Any]]) -> None:
        self.hidden = int(config["hidden"])
        self._arrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items()}
