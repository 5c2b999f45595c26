"""Compatible training for text: does a fine-tuned v2 search v1's gallery better than v1?

WordNet task of DATA.md (3,000 labelled queries, 12,000 documents). v1 =
paraphrase-MiniLM-L3-v2 (ONNX, frozen, as shipped); v2 = all-MiniLM-L6-v2 fine-tuned with
`embcompat.training.text` on (example sentence, synset document) pairs drawn only from
synsets outside the evaluation gallery; v1's vectors of the training documents are
computed once. Rows, every one on the same 3,000 queries:
- v1 old/old;
- v2 off the shelf (new/new, and raw new/old: v2 queries on v1's vectors as they are);
- v2 fine-tuned independently on the same pairs (the fair new/new baseline);
- v2 compatible for each loss combination and extra-dimension count;
- a chain: v3 = the bt2 v2 fine-tuned again, compatibly with v2, on fresh pairs; its
  new/old is reported against v1's gallery (through v2's basis) and against v2's.
new/old zero-pads v1's gallery vectors into the new space (the `basis` plan).
`ecc` is the empirical compatibility criterion: new/old above old/old.
`new_new_ratio` is new/new over the independent fine-tune's.

    python bench/text_compat.py [--pairs 3000] [--epochs 1] [--json PATH] [--only bt2-e128]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import embed, print_table, write_json

from embcompat.adapters.basis import zero_pad
from embcompat.datasets import wordnet_pairs, wordnet_task
from embcompat.registry.shipped import MINILM_L6, PARAPHRASE_L3, shipped_model_path
from embcompat.settings import get_settings
from embcompat.training.text import (
    TextPairs,
    TextTrainConfig,
    pairs_from_texts,
    recall_at_10,
    save_model,
    train_compatible,
)

# (row name, method, extra dims, loss weights overriding the method's)
COMBINATIONS: list[tuple[str, str, int, dict[str, float]]] = [
    ("bt2-e0", "bt2", 0, {}),
    ("bt2-e128", "bt2", 128, {}),  # the chain's v2
    ("bt2-e384", "bt2", 384, {}),
    ("bt2-new2-e0", "bt2", 0, {"new": 2.0}),
    ("bct-e0", "bct", 0, {}),
    ("bct-new2-e0", "bct", 0, {"new": 2.0}),
    ("oca-e128", "oca", 128, {}),
    ("bt2-no-align-e128", "bt2", 128, {"align": 0.0}),
]
CHAIN_V2 = "bt2-e128"
COLUMNS = ["method", "step", "extra_dims", "dim", "r10_old_old", "r10_new_new",
           "r10_new_old", "ecc", "new_new_ratio", "train_s"]  # fmt: skip


def split_at_document(rows: list[tuple[str, str]], n: int) -> tuple[list[Any], list[Any]]:
    """First n rows and the rest, cut where the document changes (pairs of one synset
    stay on one side)."""
    cut = n
    while 0 < cut < len(rows) and rows[cut][1] == rows[cut - 1][1]:
        cut += 1
    return rows[:cut], rows[cut:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=3000, help="training pairs per model")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--queries", type=int, default=3000)
    ap.add_argument("--gallery", type=int, default=12000)
    ap.add_argument("--only", nargs="*", help="compatible rows to run (default: all)")
    ap.add_argument("--no-chain", action="store_true")
    ap.add_argument("--json", type=Path)
    ap.add_argument(
        "--ledger", type=Path, default=Path("bench/results/text_compat.rows.jsonl"),
        help="rows already measured with the same settings are read back, not retrained",
    )  # fmt: skip
    args = ap.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    models = get_settings().resolved_data_dir / "models"

    task = wordnet_task(args.queries, args.gallery)
    rel = task.relevant
    v1_q, v1_g = embed(task.queries, PARAPHRASE_L3), embed(task.gallery, PARAPHRASE_L3)
    old_old = recall_at_10(v1_q, v1_g, rel)
    all_pairs = wordnet_pairs(task.gallery_ids, 2 * args.pairs + 200, seed=0)
    v2_rows, v3_rows = split_at_document(all_pairs, args.pairs)
    v3_rows = v3_rows[: args.pairs]
    queries, docs, doc_of = pairs_from_texts(v2_rows)
    pairs = TextPairs(queries, docs, doc_of, embed(docs, PARAPHRASE_L3))
    print(f"{len(queries)} training pairs on {len(docs)} documents; v1 old/old {old_old:.3f}")

    from sentence_transformers import SentenceTransformer

    base = SentenceTransformer(str(shipped_model_path(MINILM_L6, models)), device="cpu")
    rows: list[dict[str, Any]] = []

    def row(
        method: str, step: str, q: np.ndarray, g: np.ndarray | None, **extra: Any
    ) -> dict[str, Any]:
        new_old = (
            recall_at_10(q, zero_pad(v1_g, q.shape[1]), rel)
            if q.shape[1] >= v1_g.shape[1]
            else float("nan")
        )
        out = {
            "method": method, "step": step, "extra_dims": 0, "dim": q.shape[1],
            "r10_old_old": old_old,
            "r10_new_new": recall_at_10(q, g, rel) if g is not None else float("nan"),
            "r10_new_old": new_old, "ecc": bool(new_old > old_old), "train_s": 0.0,
            **extra,
        }  # fmt: skip
        rows.append(out)
        print_table([out], COLUMNS)
        return out

    row("v1", "v1", v1_q, v1_g)
    row("off-the-shelf", "v1->v2", embed(task.queries, MINILM_L6), embed(task.gallery, MINILM_L6))

    def encode(model: Any) -> tuple[np.ndarray, np.ndarray, float]:
        t0 = time.perf_counter()
        q = model.encode(task.queries, batch_size=128, convert_to_numpy=True)
        g = model.encode(task.gallery, batch_size=128, convert_to_numpy=True)
        return q, g, time.perf_counter() - t0

    def config(method: str, extra: int, weights: dict[str, float]) -> TextTrainConfig:
        return TextTrainConfig(
            method=method, extra_dims=extra, weights=weights, epochs=args.epochs,
            batch_size=args.batch_size, progress=False,
        )  # fmt: skip

    settings = {"pairs": args.pairs, "epochs": args.epochs, "batch_size": args.batch_size,
                "queries": args.queries, "gallery": args.gallery}  # fmt: skip
    done = _read_ledger(args.ledger, settings)

    def trained_row(
        name: str, method: str, extra: int, weights: dict[str, float]
    ) -> dict[str, Any]:
        if name in done:
            rows.append(done[name])
            print_table([done[name]], COLUMNS)
            return done[name]
        res = train_compatible(base, pairs, config(method, extra, weights))
        q, g, _ = encode(res.model)
        out = row(name, "v1->v2", q, g, extra_dims=extra, train_s=res.train_s,
                  weights=res.weights)  # fmt: skip
        if name == CHAIN_V2:  # kept for the chain (and a rerun of it)
            save_model(res.model, chain_dir)
            np.save(chain_dir / "queries.npy", q)
            np.save(chain_dir / "gallery.npy", g)
        _append_ledger(args.ledger, settings, out)
        return out

    chain_dir = args.ledger.parent / ("text_compat-v2-" + "-".join(map(str, settings.values())))

    def chain_row(chain_dir: Path) -> None:
        if "chain" in done:
            rows.append(done["chain"])
            return
        v2 = SentenceTransformer(str(chain_dir), device="cpu")
        v2_q, v2_g = np.load(chain_dir / "queries.npy"), np.load(chain_dir / "gallery.npy")
        q3, d3, of3 = pairs_from_texts(v3_rows)
        old3 = v2.encode(d3, batch_size=128, convert_to_numpy=True)  # v2's stored vectors
        res = train_compatible(v2, TextPairs(q3, d3, of3, old3), config("bt2", 128, {}))
        q, g, _ = encode(res.model)
        v3 = row("chain", "v1->v2->v3", q, g, extra_dims=128, train_s=res.train_s)
        v3["r10_new_old_v2"] = recall_at_10(q, zero_pad(v2_g, q.shape[1]), rel)
        v3["r10_v2_old_old"] = recall_at_10(v2_q, v2_g, rel)
        v3["new_new_ratio"] = v3["r10_new_new"] / independent["r10_new_new"]
        print(f"v3 on v2's gallery: new/old {v3['r10_new_old_v2']:.3f} vs v2 new/new "
              f"{v3['r10_v2_old_old']:.3f}")  # fmt: skip
        _append_ledger(args.ledger, settings, {**v3, "method": "chain"})

    independent = trained_row("independent", "independent", 0, {})
    for name, method, extra, weights in COMBINATIONS:
        if not args.only or name in args.only:
            trained_row(name, method, extra, weights)
        if name == CHAIN_V2 and not args.no_chain and (chain_dir / "gallery.npy").exists():
            chain_row(chain_dir)

    for r in rows:
        r["new_new_ratio"] = r["r10_new_new"] / independent["r10_new_new"]
    print()
    print_table(rows, COLUMNS)
    if args.json:
        write_json(args.json, rows)


def _read_ledger(path: Path, settings: dict[str, int]) -> dict[str, dict[str, Any]]:
    if not path.exists():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        if entry["settings"] == settings:
            out[entry["row"]["method"]] = entry["row"]
    return out


def _append_ledger(path: Path, settings: dict[str, int], row: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fh.write(json.dumps({"settings": settings, "row": row}) + "\n")


if __name__ == "__main__":
    main()
