"""Shared by the benchmarks: the model pairs of DATA.md, their WordNet embeddings
(cached under the data dir), and table/JSON output."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from embcompat.datasets import RetrievalTask, cached_encode, wordnet_task
from embcompat.registry.shipped import MINILM_L6, MPNET, PARAPHRASE_L3, load_shipped_encoder
from embcompat.settings import get_settings

PAIRS = {
    "minilm-l6->mpnet": (MINILM_L6, MPNET),
    "paraphrase-l3->minilm-l6": (PARAPHRASE_L3, MINILM_L6),
}


@dataclass
class Embedded:
    """One model pair on one task: queries, gallery and pool by each model."""

    task: RetrievalTask
    q_old: np.ndarray
    q_new: np.ndarray
    g_old: np.ndarray
    g_new: np.ndarray
    p_old: np.ndarray
    p_new: np.ndarray


def embed(texts: Sequence[str], model: str) -> np.ndarray:
    data = get_settings().resolved_data_dir
    cache = data / "cache" / "embeddings"
    if not texts:
        return np.zeros((0, 1), np.float32)
    t0 = time.perf_counter()
    out = cached_encode(
        model, texts, lambda t: _encoder(model, data / "models").encode(t, batch_size=32), cache
    )
    took = time.perf_counter() - t0
    if took > 1:
        print(f"  encoded {len(texts)} texts with {model} in {took:.0f}s", flush=True)
    return out


_ENCODERS: dict[str, Any] = {}


def _encoder(model: str, models_dir: Path) -> Any:
    if model not in _ENCODERS:
        _ENCODERS[model] = load_shipped_encoder(model, models_dir)
    return _ENCODERS[model]


def embedded_pair(pair: str, n_queries: int, n_gallery: int, n_pool: int) -> Embedded:
    old, new = PAIRS[pair]
    task = wordnet_task(n_queries, n_gallery, n_pool)
    return Embedded(
        task,
        embed(task.queries, old),
        embed(task.queries, new),
        embed(task.gallery, old),
        embed(task.gallery, new),
        embed(task.pool, old),
        embed(task.pool, new),
    )


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def write_json(path: str | None, payload: Any) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2))
        print(f"wrote {path}")
