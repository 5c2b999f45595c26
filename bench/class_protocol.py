"""Compatible training on the class-based protocol of the BCT / BT² / OCA papers.

Fashion-MNIST (Debian's dataset-fashion-mnist). v1: a narrow CNN trained on classes 0-4;
v2: a wider CNN on all 10 classes, trained compatible with v1 by each method; v3: a
wider one again, trained compatible with v2 (v1's gallery is never re-embedded). The
10k test images are queries and gallery (a query never retrieves itself). For each
method and step (v1->v2, v2->v3, v1->v3): top-1 and mAP@R for old/old, new/new and
new/old (old vectors zero-padded to the new dim, the `basis` plan), the empirical
compatibility criterion (ECC: new/old top-1 > old/old top-1), and new_new_ratio = the
method's new/new top-1 over that of the independently trained model of the same step.

    python bench/class_protocol.py [--json PATH] [--quick]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import torch
from common import print_table, write_json

from embcompat.training.fashion import load_fashion_mnist
from embcompat.training.methods import METHODS, TrainedModel, train_model
from embcompat.training.trainer import TrainConfig

V1, V2, V3 = (16, 32, 64), (32, 64, 128), (48, 96, 192)
OLD_DIM, EXTRA = 64, 64
COLUMNS = [
    "method",
    "step",
    "top1_old_old",
    "top1_new_new",
    "top1_new_old",
    "map_old_old",
    "map_new_new",
    "map_new_old",
    "ecc",
    "new_new_ratio",
]


def retrieval(
    queries: np.ndarray, gallery: np.ndarray, labels: np.ndarray, chunk: int = 1000
) -> tuple[float, float]:
    """Leave-one-out retrieval over the same items → (top-1 accuracy, mAP@R), where R
    is the number of other items of the query's class."""
    if gallery.shape[1] < queries.shape[1]:  # old vectors enter a wider space zero-padded
        gallery = np.pad(gallery, ((0, 0), (0, queries.shape[1] - gallery.shape[1])))
    q, g = torch.from_numpy(queries), torch.from_numpy(gallery)
    lab = torch.from_numpy(labels)
    counts = torch.bincount(lab)
    r_max = int(counts.max()) - 1
    top1, aps = [], []
    for s in range(0, len(q), chunk):
        sims = q[s : s + chunk] @ g.T
        rows = torch.arange(len(sims))
        sims[rows, rows + s] = -float("inf")
        ranked = sims.topk(r_max, dim=1).indices
        hits = (lab[ranked] == lab[s : s + chunk, None]).float()
        r = (counts[lab[s : s + chunk]] - 1).float()
        within = torch.arange(1, r_max + 1)[None, :] <= r[:, None]
        hits = hits * within
        precision = hits.cumsum(1) / torch.arange(1, r_max + 1)[None, :]
        aps.append((precision * hits).sum(1) / r)
        top1.append(hits[:, 0])
    return float(torch.cat(top1).mean()), float(torch.cat(aps).mean())


def run(quick: bool, seed: int = 0) -> list[dict[str, Any]]:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    x, y = load_fashion_mnist("train")
    xt, yt = load_fashion_mnist("test")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    if quick:
        order, xt, yt = order[:3000], xt[:1000], yt[:1000]
    n_val = len(order) // 12
    val_idx, train_idx = order[:n_val], order[n_val:]
    val = (x[val_idx], y[val_idx])
    epochs = 2 if quick else 5
    cfg = TrainConfig(epochs=epochs, seed=seed, patience=2)

    def fit(
        method: str, channels: tuple[int, ...], old: TrainedModel | None, classes: int
    ) -> TrainedModel:
        keep = train_idx[y[train_idx] < classes]
        vkeep = val[1] < classes
        t0 = time.perf_counter()
        model = train_model(
            method,
            x[keep],
            y[keep],
            channels,
            OLD_DIM,
            cfg,
            old=old,
            extra_dims=EXTRA,
            val=(val[0][vkeep], val[1][vkeep]),
        )
        print(f"  trained {method} {channels} in {time.perf_counter() - t0:.0f}s", flush=True)
        return model

    v1 = fit("independent", V1, None, 5)
    v1_simplex = fit("dsimplex", V1, None, 5)
    emb: dict[str, dict[str, np.ndarray]] = {}
    for method in METHODS:
        old = v1_simplex if method == "dsimplex" else v1
        v2 = fit(method, V2, old if method != "independent" else None, 10)
        v3 = fit(method, V3, v2 if method != "independent" else None, 10)
        emb[method] = {"v1": old.embed(xt), "v2": v2.embed(xt), "v3": v3.embed(xt)}

    rows = []
    for method in METHODS:
        e, ind = emb[method], emb["independent"]
        for step, (o, n) in {
            "v1->v2": ("v1", "v2"),
            "v2->v3": ("v2", "v3"),
            "v1->v3": ("v1", "v3"),
        }.items():
            oo, nn_, no = (
                retrieval(e[o], e[o], yt),
                retrieval(e[n], e[n], yt),
                retrieval(e[n], e[o], yt),
            )
            ind_nn = retrieval(ind[n], ind[n], yt)[0]
            rows.append(
                {
                    "method": method,
                    "step": step,
                    "top1_old_old": oo[0],
                    "top1_new_new": nn_[0],
                    "top1_new_old": no[0],
                    "map_old_old": oo[1],
                    "map_new_new": nn_[1],
                    "map_new_old": no[1],
                    "ecc": bool(no[0] > oo[0]),
                    "new_new_ratio": nn_[0] / ind_nn,
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the rows as a JSON list")
    parser.add_argument("--quick", action="store_true", help="small slice, 2 epochs (tests)")
    args = parser.parse_args()
    t0 = time.perf_counter()
    rows = run(args.quick)
    print()
    print_table(rows, COLUMNS)
    for method in METHODS:
        mine = [r for r in rows if r["method"] == method]
        ok = all(r["ecc"] for r in mine) and min(r["new_new_ratio"] for r in mine) >= 0.98
        print(f"{method:12s} ECC on every step with new_new_ratio >= 0.98: {ok}")
    write_json(args.json, rows)
    print(f"took {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
