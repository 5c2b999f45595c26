"""What do binary codes keep of float search, and what do they save?

On the WordNet task (3,000 labelled queries over a 12,000-document gallery) embedded by
the new model of the primary pair (MPNet, 768-d), fits ITQ and the recurrent binarizer
at 1, 2 and 4 bits per dimension on 8,000 other documents, and for a flat and an HNSW
index measures (floats for re-ranking read from a vector store on disk):
Three stages per row: `hamming` (binary index alone), `codes` (its top 200 re-scored
asymmetrically from the codes: the float query against the binary items, no float read;
how BEBR reads multi-bit codes) and `float` (its top 100 re-scored with the floats).
- recall10_rel: labelled R@10 over that of float exact search; nn_recall10: the share
  of float exact search's top 10 that comes back;
- bytes_per_vector (code bytes), memory_ratio (float index bytes / binary index bytes,
  same index type, ids included), qps_ratio (queries/s over the float index of the same
  type, same queries, median of repeats, measured in this run).
The mixed rows code a gallery mid-upgrade (half MiniLM vectors mapped into the MPNet
space by a gallery-side Procrustes map, half MPNet) with one shared binarizer, against
float exact search of the same mixed gallery.

    python bench/binary.py [--json PATH] [--repeats 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from common import embedded_pair, print_table, write_json

from embcompat.adapters import ProcrustesAdapter
from embcompat.adapters.binary import Binarizer, fit_binarizer, fit_shared
from embcompat.adapters.metrics import neighbour_recall, recall_at_k
from embcompat.index.binary import BinaryIndex, TwoStageSearcher
from embcompat.index.faiss_index import build_index
from embcompat.index.store import SpaceStore

RERANK = 100
CODE_RERANK = 200
# (float re-rank depth, code re-score depth): Hamming only; Hamming then asymmetric
# scores from the codes (no float read); Hamming then exact floats from disk
STAGES = {"hamming": (0, 0), "codes": (0, CODE_RERANK), "float": (RERANK, 0)}
COLUMNS = [
    "method",
    "bits_per_dim",
    "index",
    "stage",
    "rerank",
    "mixed",
    "r10",
    "recall10_rel",
    "nn_recall10",
    "bytes_per_vector",
    "memory_ratio",
    "qps_ratio",
    "fit_s",
]


def _median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


class FloatBaseline:
    """Float index of one type over the gallery: its ranking, memory and search time."""

    def __init__(self, gallery: np.ndarray, queries: np.ndarray, kind: str, repeats: int) -> None:
        ids = np.arange(len(gallery), dtype=np.int64)
        index = build_index(gallery, ids, kind, "ip")  # type: ignore[arg-type]
        self.memory = int(faiss.serialize_index(index).nbytes)
        self.seconds = _median_seconds(lambda: index.search(queries, 10), repeats)
        self.ranked = index.search(queries, 10)[1]


def _rows_for(
    binarizer: Binarizer,
    codes: np.ndarray,
    stores: list[SpaceStore],
    queries: np.ndarray,
    relevant: np.ndarray,
    exact: np.ndarray,
    baselines: dict[str, FloatBaseline],
    repeats: int,
    common: dict[str, Any],
) -> list[dict[str, Any]]:
    r10_exact = recall_at_k(exact, relevant)
    rows = []
    for kind, base in baselines.items():
        index = BinaryIndex.build(codes, np.arange(len(codes), dtype=np.int64), kind)  # type: ignore[arg-type]
        searcher = TwoStageSearcher(binarizer, index, stores)
        for stage, (rerank, code_rerank) in STAGES.items():
            ranked = searcher.search(queries, 10, rerank, code_rerank)[1]
            secs = _median_seconds(
                lambda s=searcher, r=rerank, c=code_rerank: s.search(queries, 10, r, c), repeats
            )
            r10 = recall_at_k(ranked, relevant)
            rows.append(
                {
                    **common,
                    "index": kind,
                    "stage": stage,
                    "rerank": rerank,
                    "code_rerank": code_rerank,
                    "r10": r10,
                    "recall10_rel": r10 / r10_exact,
                    "nn_recall10": neighbour_recall(ranked, exact),
                    "bytes_per_vector": binarizer.bits / 8,
                    "memory_ratio": base.memory / index.memory_bytes(),
                    "qps_ratio": base.seconds / secs,
                }
            )
            print("  " + "  ".join(f"{k}={_fmt(rows[-1][k])}" for k in COLUMNS), flush=True)
    return rows


def _fmt(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def _store(root: Path, name: str, ids: np.ndarray, vectors: np.ndarray) -> SpaceStore:
    store = SpaceStore(root / name, dim=vectors.shape[1])
    store.add(ids, vectors)
    return store


def run(repeats: int, bits: list[int], seed: int = 0) -> list[dict[str, Any]]:
    e = embedded_pair("minilm-l6->mpnet", 3000, 12000, 8000)
    rel, q = e.task.relevant, e.q_new
    ids = np.arange(len(e.g_new), dtype=np.int64)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        store = _store(root, "new", ids, e.g_new)
        baselines = {k: FloatBaseline(e.g_new, q, k, repeats) for k in ("flat", "hnsw")}
        exact = baselines["flat"].ranked
        print(f"float exact R@10 {recall_at_k(exact, rel):.3f} (MPNet, {len(ids)} docs)")
        for method in ("itq", "recurrent"):
            for bpd in bits:
                t0 = time.perf_counter()
                binarizer = fit_binarizer(method, e.p_new, bpd, seed=seed)
                common = {"method": method, "bits_per_dim": bpd, "mixed": False}
                common["fit_s"] = time.perf_counter() - t0
                codes = binarizer.codes(e.g_new)
                rows += _rows_for(
                    binarizer, codes, [store], q, rel, exact, baselines, repeats, common
                )

        # mid-upgrade: half the gallery still MiniLM (mapped into MPNet space), half MPNet
        mapper = ProcrustesAdapter.fit(e.p_old, e.p_new, direction="gallery: old->new")
        moved = np.random.default_rng(seed).random(len(ids)) < 0.5
        mixed = np.where(moved[:, None], e.g_new, mapper.transform(e.g_old))
        stores = [
            _store(root, "mixed-new", ids[moved], e.g_new[moved]),
            _store(root, "mixed-mapped", ids[~moved], mixed[~moved]),
        ]
        mixed_base = {"flat": FloatBaseline(mixed, q, "flat", repeats)}
        for method in ("itq", "recurrent"):
            t0 = time.perf_counter()
            binarizer = fit_shared(method, e.p_new, e.p_old, mapper, 1, seed=seed)
            common = {"method": method, "bits_per_dim": 1, "mixed": True}
            common["fit_s"] = time.perf_counter() - t0
            rows += _rows_for(
                binarizer,
                binarizer.codes(mixed),
                stores,
                q,
                rel,
                mixed_base["flat"].ranked,
                mixed_base,
                repeats,
                common,
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the rows as a JSON list")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bits", default="1,2,4", help="bits per dimension to measure")
    args = parser.parse_args()
    t0 = time.perf_counter()
    rows = run(args.repeats, [int(b) for b in args.bits.split(",")])
    print()
    print_table(rows, COLUMNS)
    for bpd in sorted({r["bits_per_dim"] for r in rows}):
        for stage in ("hamming", "codes"):
            pick = {
                r["method"]: r["recall10_rel"]
                for r in rows
                if r["bits_per_dim"] == bpd and r["index"] == "flat" and r["stage"] == stage
                if not r["mixed"]
            }
            if len(pick) == 2:
                better = "recurrent" if pick["recurrent"] > pick["itq"] else "itq"
                print(f"{bpd} bit/dim, no float re-rank ({stage}): {better} keeps more {pick}")
    write_json(args.json, rows)
    print(f"took {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
