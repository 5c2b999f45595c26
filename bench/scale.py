"""Galleries of millions on one machine: ingest, publish, search and a mapped upgrade,
each through the service and against bare FAISS or numpy on the same data, in one run.

For each N: an external 128-d version `vec:v1` (`--dim`) holds N synthetic clustered
vectors, ingested through the service in batches of 10,000 with three metadata keys (`shard`: 10
values, 10 % each; `tenant`: 1,000 values, 0.1 % each; `price`: 0-99) and the item's
number as its text. Measured:
- ingest items/s on SQLite, and on PostgreSQL with `--database-url` (a fresh database
  is created on that server and dropped after);
- per index kind (flat, hnsw, ivfpq, binary): publish seconds, index bytes per vector,
  and per-query medians (single queries, k=10) of the service's search over bare FAISS
  searching the same published index file: unfiltered, and filtered (10 %, 0.1 %, a
  numeric range of 10 %, a negation of 90 %) against the same index searched with an
  `IDSelectorBatch` of the matching ids;
- a mapped upgrade to `vec:v2` (a pyfunc whose space is v1's turned into `--new-dim`
  dimensions, encoding an item from its text), run step by step through the service:
  its time, the map step's vectors/s over a bare matrix product of the same vectors in
  batches of MAP_BATCH (medians of 1 + MAP_REPEATS runs each: the step is run again on
  an emptied mapped space; the product with numpy's huge pages on and off, the faster
  median kept), and
  per-query medians of the mixed mid-upgrade search over bare FAISS on the same vectors
  in v2's space.

    python bench/scale.py --n 100000 1000000 [--kinds flat ivfpq] [--queries 50]
        [--database-url postgresql+psycopg2://postgres@127.0.0.1:5432/postgres]
        [--dim 128 --new-dim 128] [--skip-upgrade] [--json PATH]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss
import mlflow.pyfunc
import numpy as np
from common import print_table, write_json
from numpy._core import multiarray
from sqlalchemy import create_engine, select, text
from sqlalchemy.engine import make_url

from embcompat.arrays import l2_normalize
from embcompat.index.binary import load_binarizer
from embcompat.index.faiss_index import _params
from embcompat.registry import versions
from embcompat.registry.schema import Item
from embcompat.service import galleries, migrate, search, upgrade
from embcompat.service.context import Context
from embcompat.service.galleries.layout import gallery_dir, space_name
from embcompat.service.upgrade.backfill import MAP_BATCH
from embcompat.service.upgrade.jobs import drop_mapped_space
from embcompat.settings import Settings

DIM, NEW_DIM = 128, 128  # v1's and v2's widths (--dim, --new-dim)
BLOCK = 10_000  # vectors are generated (and ingested) in blocks of this many
KINDS = ("flat", "hnsw", "ivfpq", "binary")
MAP_REPEATS = 4  # the map step and the bare product run 1 + this many times


def block(b: int) -> np.ndarray:
    """Vectors of items b*BLOCK .. (b+1)*BLOCK-1 in v1's space: 256 clusters."""
    centres = np.random.default_rng(0).standard_normal((256, DIM)).astype(np.float32)
    rng = np.random.default_rng([1, b])
    x = centres[rng.integers(0, 256, BLOCK)] + 0.5 * rng.standard_normal((BLOCK, DIM))
    return l2_normalize(x.astype(np.float32))


def rotation() -> np.ndarray:
    """(DIM, NEW_DIM) with orthonormal rows: v1's space turned into v2's."""
    q = np.linalg.qr(np.random.default_rng(5).standard_normal((NEW_DIM, DIM)))[0]
    return q.T.astype(np.float32)


class RotatedEncoder(mlflow.pyfunc.PythonModel):  # type: ignore[misc,name-defined]
    """v2: an item's text is its number, and its v2 vector its v1 vector rotated (any
    other text encodes as the item its length names)."""

    def predict(self, context: Any, model_input: Any, params: Any = None) -> np.ndarray:
        if hasattr(model_input, "iloc"):
            model_input = model_input.iloc[:, 0].tolist()
        idx = np.array([int(t) if str(t).isdigit() else len(str(t)) for t in model_input])
        out = np.zeros((len(idx), DIM), np.float32)
        for b in np.unique(idx // BLOCK):
            sel = idx // BLOCK == b
            out[sel] = block(int(b))[idx[sel] % BLOCK]
        return out @ rotation()


def _median_ms(run: Callable[[np.ndarray], object], queries: np.ndarray) -> float:
    times = []
    for q in queries:
        t0 = time.perf_counter()
        run(q[None, :])
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _context(root: Path, database_url: str | None) -> Context:
    settings = Settings(data_dir=root, database_url=database_url)
    migrate.upgrade(settings.resolved_database_url)
    ctx = Context(settings)
    with ctx.session() as s:
        versions.register_version(
            s, ctx.registry, model="vec", version="v1", dim=DIM, source="external",
            models_dir=ctx.models_dir, policy=ctx.model_policy,
        )  # fmt: skip
    galleries.create_gallery(ctx, "g", "vec", "v1")
    return ctx


def ingest(ctx: Context, n: int) -> float:
    """Ingest n items through the service; returns items/s of the service's calls (the
    client's batches, vectors as lists as a JSON body brings them, are made untimed)."""
    seconds = 0.0
    for b in range(0, (n + BLOCK - 1) // BLOCK):
        x = block(b)
        part = range(b * BLOCK, min((b + 1) * BLOCK, n))
        items = [
            galleries.ItemIn(f"i{i}", text=str(i), vector=x[i - b * BLOCK].tolist(),
                             metadata={"shard": i % 10, "tenant": f"t{i % 1000}",
                                       "price": i % 100})
            for i in part
        ]  # fmt: skip
        t0 = time.perf_counter()
        galleries.ingest(ctx, "g", items)
        seconds += time.perf_counter() - t0
    return n / seconds


def postgres_ingest(admin_url: str, n: int) -> float:
    """Ingest on a fresh database of the server at `admin_url`, dropped afterwards."""
    name = f"embcompat_scale_{uuid.uuid4().hex[:8]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            ctx = _context(
                Path(tmp), make_url(admin_url).set(database=name).render_as_string(False)
            )
            try:
                return ingest(ctx, n)
            finally:
                ctx.close()
    finally:
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        admin.dispose()


def _generation_file(ctx: Context, space: str) -> Path:
    root = gallery_dir(ctx, "g") / "indexes" / space
    folder = root / f"gen-{int((root / 'CURRENT').read_text()):06d}"
    return next(f for f in (folder / "index.faiss", folder / "binary.faiss") if f.exists())


def _bare(
    path: Path, ctx: Context, space: str
) -> Callable[[np.ndarray, np.ndarray | None], object]:
    """Bare FAISS over the published index file: search(q, allowed ids or None)."""
    if path.name == "binary.faiss":
        index = faiss.read_index_binary(str(path))
        codes = load_binarizer(gallery_dir(ctx, "g") / "indexes" / space).codes  # the service's

        def binary(q: np.ndarray, allow: np.ndarray | None) -> object:
            params = (
                None if allow is None else faiss.SearchParameters(sel=faiss.IDSelectorBatch(allow))
            )
            return index.search(codes(q), 10, params=params)

        return binary
    index = faiss.read_index(str(path))

    def run(q: np.ndarray, allow: np.ndarray | None) -> object:
        return index.search(q, 10, params=None if allow is None else _params(index, None, allow))

    return run


def kind_rows(
    ctx: Context, n: int, ids: np.ndarray, queries: np.ndarray, kinds: list[str]
) -> list[dict[str, Any]]:
    with ctx.session() as s:
        v1 = versions.get_version(s, ctx.registry, "vec", "v1")
    i = np.arange(n)
    rows = []
    for kind in kinds:
        t0 = time.perf_counter()
        galleries.publish(ctx, "g", kind)
        publish_s = time.perf_counter() - t0
        path = _generation_file(ctx, space_name(v1.id))
        bare = _bare(path, ctx, space_name(v1.id))
        svc = lambda f: lambda q: search.search(ctx, "g", vectors=q, k=10, filters=f)  # noqa: E731
        svc(None)(queries[:1])  # load the generation
        row = {"n": n, "dims": f"{DIM}->{NEW_DIM}", "index": kind, "db": "sqlite",
               "publish_s": publish_s, "bytes_per_vector": path.stat().st_size / n}  # fmt: skip
        for key, filters, mask in (
            ("search_ratio", None, None),
            ("filtered_ratio_10", {"shard": 3}, i % 10 == 3),
            ("filtered_ratio_01", {"tenant": "t7"}, i % 1000 == 7),
            ("range_ratio_10", {"price": {"lt": 10}}, i % 100 < 10),
            ("negation_ratio_90", {"shard": {"not": 3}}, i % 10 != 3),
        ):
            allow = None if mask is None else np.ascontiguousarray(np.sort(ids[mask]))
            svc(filters)(queries[:1])  # the filter's allow-set is built once per write
            mine = _median_ms(svc(filters), queries)
            ref = _median_ms(lambda q: bare(q, allow), queries)  # noqa: B023
            row[key] = mine / ref
            row[key.replace("ratio", "ms")] = mine
            row[key.replace("ratio", "faiss_ms")] = ref
        rows.append(row)
        print_table([row], list(row))
    return rows


def mapped_upgrade(ctx: Context, n: int, queries: np.ndarray) -> dict[str, float]:
    """A mapped upgrade through the service, step by step: seconds, map ratio, mixed
    search ratio."""
    with ctx.registry.run("log vec:v2", {}):
        info = ctx.registry.mlflow.pyfunc.log_model(
            name="encoder", python_model=RotatedEncoder(), pip_requirements=["numpy"]
        )
    with ctx.session() as s:
        versions.register_version(
            s, ctx.registry, model="vec", version="v2", dim=NEW_DIM, source="mlflow",
            location=info.model_uri, parent="v1", models_dir=ctx.models_dir,
            policy=ctx.model_policy, logged_here=True,
        )  # fmt: skip
    galleries.publish(ctx, "g", "flat")
    t0 = time.perf_counter()
    job = upgrade.start_upgrade(ctx, "g", "vec", "v2", plan="mapped", override=True,
                                pairs=2000, chunk_size=10_000)  # fmt: skip
    upgrade.step_pair(ctx, job.id)
    upgrade.step_train(ctx, job.id)
    upgrade.step_gate(ctx, job.id)
    batches = upgrade.map_batches(ctx, job.id)

    def map_step() -> tuple[int, float]:
        t = time.perf_counter()
        return sum(upgrade.map_chunks(ctx, job.id, seqs) for seqs in batches), (
            time.perf_counter() - t
        )

    mapped, map_s = map_step()
    t_repeats = time.perf_counter()  # the step again, MAP_REPEATS times, untimed in total_s
    map_times = [map_s]
    for _ in range(MAP_REPEATS):
        drop_mapped_space(ctx, job.id)  # the job's mapped space, written again from empty
        map_times.append(map_step()[1])
    t0 += time.perf_counter() - t_repeats
    upgrade.publish_mapped(ctx, job.id)
    upgrade.step_start_backfill(ctx, job.id)
    total_s = time.perf_counter() - t0
    state = upgrade.get_job(ctx, job.id)
    if state.state != "backfilling" or state.plan != "mapped":
        raise RuntimeError(f"the upgrade stopped in {state.state} ({state.error})")

    # bare product on the same batches: the vectors in memory, one matrix product each
    w = np.random.default_rng(0).standard_normal((DIM, NEW_DIM)).astype(np.float32)
    x = np.concatenate([block(b) for b in range((n + BLOCK - 1) // BLOCK)])[:n]
    per = MAP_BATCH  # the written map's batches: smaller products than a folded batch
    bare_s = float("inf")
    for huge in (True, False):  # numpy's huge pages either way (the service turns them
        # off, which slows the fresh product outputs): the faster median is the baseline
        was = multiarray._set_madvise_hugepage(huge)
        bare_times = []
        for _ in range(MAP_REPEATS + 1):
            t1 = time.perf_counter()
            for start in range(0, n, per):
                x[start : start + per] @ w
            bare_times.append(time.perf_counter() - t1)
        multiarray._set_madvise_hugepage(was)
        bare_s = min(bare_s, statistics.median(bare_times))
    map_s = statistics.median(map_times)

    bare = faiss.IndexFlatIP(NEW_DIM)
    bare.add(x @ rotation())
    q2 = queries @ rotation()
    search.search(ctx, "g", vectors=q2[:1], k=10)
    mine = _median_ms(lambda q: search.search(ctx, "g", vectors=q, k=10), q2)
    ref = _median_ms(lambda q: bare.search(q, 10), q2)
    return {"mapped_upgrade_s": total_s, "map_s": map_s, "map_first_s": map_times[0],
            "bare_s": bare_s, "mapped": mapped,
            "map_ratio": bare_s / map_s, "mixed_ratio": mine / ref, "mixed_ms": mine,
            "mixed_faiss_ms": ref}  # fmt: skip


def main() -> None:
    global DIM, NEW_DIM  # the widths every helper generates and maps with
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[100_000])
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--database-url", help="a PostgreSQL server's admin URL, for ingest")
    parser.add_argument("--skip-upgrade", action="store_true")
    parser.add_argument("--dim", type=int, default=DIM, help="v1's width")
    parser.add_argument("--new-dim", type=int, default=NEW_DIM, help="v2's width (>= --dim)")
    parser.add_argument("--json", help="write the rows")
    args = parser.parse_args()
    DIM, NEW_DIM = args.dim, max(args.new_dim, args.dim)
    queries = block(10**6)[: args.queries]  # drawn like the gallery, never in it
    rows: list[dict[str, Any]] = []
    for n in args.n:
        with tempfile.TemporaryDirectory() as tmp:
            ctx = _context(Path(tmp), None)
            rate = ingest(ctx, n)
            print(f"N={n}: ingest {rate:.0f} items/s (sqlite), peak RSS {_rss_mb():.0f} MB")
            with ctx.session() as s:
                by_name = dict(s.execute(select(Item.external_id, Item.id)).all())
            ids = np.array([by_name[f"i{i}"] for i in range(n)], np.int64)
            found = kind_rows(ctx, n, ids, queries, args.kinds)
            up = {} if args.skip_upgrade else mapped_upgrade(ctx, n, queries)
            for row in found:
                row.update(ingest_items_s=rate, peak_rss_mb=_rss_mb(), **up)
            rows += found
            ctx.close()
        if args.database_url:
            pg = postgres_ingest(args.database_url, n)
            print(f"N={n}: ingest {pg:.0f} items/s (postgresql)")
            rows.append({"n": n, "index": "flat", "db": "postgresql", "ingest_items_s": pg})
    keys = ["n", "index", "db", "ingest_items_s", "publish_s", "bytes_per_vector", "search_ratio",
            "filtered_ratio_10", "filtered_ratio_01", "mixed_ratio", "map_ratio",
            "mapped_upgrade_s", "peak_rss_mb"]  # fmt: skip
    print_table(rows, keys)
    write_json(args.json, rows)


if __name__ == "__main__":
    main()
