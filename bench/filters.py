"""Filtered search through the service against FAISS's own filtered search.

A gallery of an external 128-d version holds N clustered vectors ingested through the
service (batches of 10,000) with two metadata keys: `shard` (10 values: 10 % of the
items each) and `tenant` (1,000 values: 0.1 %). Per-query medians over single-query
searches (k=10, flat index) of: the service unfiltered, against a bare `IndexFlatIP`
on the same vectors; the service filtered on one `shard` and on one `tenant`, against
the bare index searched with an `IDSelectorBatch` of the matching ids; and a numeric
range filter. The service's time includes everything a request does but the HTTP layer.

    python bench/filters.py [--n 200000] [--queries 50] [--json PATH] [--database-url URL]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
from common import print_table, write_json

from embcompat.arrays import l2_normalize
from embcompat.registry import versions
from embcompat.service import galleries, migrate, search
from embcompat.service.context import Context
from embcompat.settings import Settings

DIM = 128


def _vectors(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((256, DIM)).astype(np.float32)
    x = centres[rng.integers(0, 256, n)] + 0.5 * rng.standard_normal((n, DIM)).astype(np.float32)
    return l2_normalize(x)


def _median_ms(run: object, queries: np.ndarray) -> float:
    times = []
    for q in queries:
        t0 = time.perf_counter()
        run(q[None, :])  # type: ignore[operator]
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--json", help="write the rows")
    parser.add_argument("--database-url", help="an empty database (default: SQLite)")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="embcompat-filters-"))
    settings = Settings(data_dir=root, database_url=args.database_url)
    migrate.upgrade(settings.resolved_database_url)
    ctx = Context(settings)
    with ctx.session() as s:
        versions.register_version(
            s, ctx.registry, model="vec", version="v1", dim=DIM, source="external",
            models_dir=ctx.models_dir, policy=ctx.model_policy,
        )  # fmt: skip
    galleries.create_gallery(ctx, "g", "vec", "v1")
    x = _vectors(args.n)
    t0 = time.perf_counter()
    for start in range(0, args.n, 10_000):
        part = range(start, min(start + 10_000, args.n))
        galleries.ingest(ctx, "g", [
            galleries.ItemIn(f"i{i}", vector=x[i].tolist(),
                             metadata={"shard": i % 10, "tenant": f"t{i % 1000}", "price": i % 100})
            for i in part
        ])  # fmt: skip
    ingest_s = time.perf_counter() - t0
    galleries.publish(ctx, "g")

    with ctx.session() as s:
        from sqlalchemy import select

        from embcompat.registry.schema import Item

        db_ids = dict(s.execute(select(Item.external_id, Item.id)).all())
    ids = np.array([db_ids[f"i{i}"] for i in range(args.n)], np.int64)
    bare = faiss.IndexIDMap(faiss.IndexFlatIP(DIM))
    bare.add_with_ids(x, ids)
    queries = _vectors(args.queries, seed=1)

    def service(filters: dict[str, object] | None) -> object:
        return lambda q: search.search(ctx, "g", vectors=q, k=10, filters=filters)

    def faiss_with(mask: np.ndarray | None) -> object:
        if mask is None:
            return lambda q: bare.search(q, 10)
        params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(ids[mask]))
        return lambda q: bare.search(q, 10, params=params)

    search.search(ctx, "g", vectors=queries[:1], k=10, filters={"shard": 0})  # warm caches
    i = np.arange(args.n)
    cases = [
        ("unfiltered", None, None),
        ("shard = 3 (10 %)", {"shard": 3}, i % 10 == 3),
        ("tenant = t7 (0.1 %)", {"tenant": "t7"}, i % 1000 == 7),
        ("price < 10 (10 %)", {"price": {"lt": 10}}, i % 100 < 10),
        ("shard not 3 (90 %)", {"shard": {"not": 3}}, i % 10 != 3),
    ]
    rows = []
    for name, filters, mask in cases:
        svc, ref = _median_ms(service(filters), queries), _median_ms(faiss_with(mask), queries)
        rows.append({"n": args.n, "search": name, "service_ms": svc, "faiss_ms": ref,
                     "ratio": svc / ref})  # fmt: skip
    db = "postgresql" if args.database_url else "sqlite"
    print(f"N={args.n}: ingest {args.n / ingest_s:.0f} items/s through the service ({db})")
    print_table(rows, ["n", "search", "service_ms", "faiss_ms", "ratio"])
    write_json(args.json, {"ingest_items_s": args.n / ingest_s, "rows": rows})
    ctx.close()


if __name__ == "__main__":
    main()
