"""One training loop for every method: minibatches, validation, early stopping, progress,
and a checkpoint per epoch from which a run resumes to the same result."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class TrainConfig:
    epochs: int = 5
    batch_size: int = 256
    lr: float = 2e-3
    patience: int = 2  # epochs without a better validation score before stopping
    seed: int = 0
    checkpoint: Path | None = None  # written after every epoch; resumed from if present
    progress: bool = True


@dataclass
class TrainResult:
    epochs_run: int
    best_epoch: int
    best_score: float
    history: list[dict[str, float]] = field(default_factory=list)


def train(
    module: nn.Module,
    loss_fn: LossFn,
    x: torch.Tensor,
    y: torch.Tensor,
    validate: Callable[[], float],
    config: TrainConfig,
    name: str = "train",
) -> TrainResult:
    """Minimise loss_fn(images, labels, row indices) over (x, y); keep the weights of the
    epoch with the best `validate()` (higher is better) and stop after `patience` epochs
    without improvement. Batch order is a function of (seed, epoch) alone, so stopping
    after any epoch and resuming from its checkpoint ends at the same weights."""
    opt = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=config.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(config.epochs, 1))
    state: dict[str, Any] = {"epoch": 0, "best": -float("inf"), "best_epoch": 0, "bad": 0}
    state["best_state"], state["history"] = copy.deepcopy(module.state_dict()), []
    if config.checkpoint is not None and config.checkpoint.exists():
        saved = torch.load(config.checkpoint, weights_only=False)
        module.load_state_dict(saved["module"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        state = saved["state"]
    bar = tqdm(total=config.epochs, initial=state["epoch"], desc=name, disable=not config.progress)
    while state["epoch"] < config.epochs and state["bad"] < config.patience:
        epoch = state["epoch"]
        module.train()
        order = torch.randperm(
            len(x), generator=torch.Generator().manual_seed(config.seed * 1000 + epoch)
        )
        total = 0.0
        for start in range(0, len(order), config.batch_size):
            idx = order[start : start + config.batch_size]
            loss = loss_fn(x[idx], y[idx], idx)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        sched.step()
        module.eval()
        with torch.no_grad():
            score = validate()
        state["history"].append({"epoch": epoch + 1, "loss": total / len(x), "val": score})
        if score >= state["best"]:  # ties go to the later epoch (e.g. no validation set)
            state.update(best=score, best_epoch=epoch + 1, bad=0)
            state["best_state"] = copy.deepcopy(module.state_dict())
        else:
            state["bad"] += 1
        state["epoch"] = epoch + 1
        bar.update(1)
        bar.set_postfix(loss=f"{total / len(x):.3f}", val=f"{score:.3f}")
        if config.checkpoint is not None:
            _save(config.checkpoint, module, opt, sched, state)
    bar.close()
    module.load_state_dict(state["best_state"])
    module.eval()
    return TrainResult(state["epoch"], state["best_epoch"], state["best"], state["history"])


def _save(path: Path, module: nn.Module, opt: Any, sched: Any, state: dict[str, Any]) -> None:
    """Atomic: a crash mid-write leaves the previous epoch's checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    blob = {
        "module": module.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "state": state,
    }
    torch.save(blob, tmp)
    os.replace(tmp, path)
