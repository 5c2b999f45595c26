"""PostgreSQL item writes at scale: the service's write of new items (one INSERT ...
ON CONFLICT DO NOTHING RETURNING, `galleries.items.insert_new`) against the write it
replaced (ids of existing items looked up, ids drawn from the sequence, rows streamed
by COPY), on a gallery already holding N items.

A fresh database on the server at `--database-url` gets N items ingested through the
service (bench/scale.py's gallery), then, per repetition, two batches of `--batch` new
items are written in their own transactions: one by the former write's raw statements,
one by the service's `insert_new`. Prints per-batch medians and the service's ratio to
the former write. The database is dropped afterwards.

    python bench/pg_insert.py --n 1000000
        [--database-url postgresql+psycopg2://postgres@127.0.0.1:5432/postgres]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg2
import scale
from common import print_table
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from embcompat.registry.schema import utcnow
from embcompat.service.context import Context
from embcompat.service.galleries.items import insert_new

COLUMNS = "id, gallery_id, external_id, payload, meta, vector_version_id, meta_seq, created_at, updated_at"  # noqa: E501


def _rows(tag: str, n: int) -> list[tuple[str, str, str]]:
    """(external id, payload, metadata JSON) like bench/scale.py's items."""
    meta = [{"shard": i % 10, "tenant": f"t{i % 1000}", "price": i % 100} for i in range(n)]
    return [(f"{tag}{i}", str(i), json.dumps(m)) for i, m in enumerate(meta)]


def copy_write(cur: Any, g: int, v: int, rows: list[tuple[str, str, str]]) -> None:
    """The write of new items the service used before `insert_new`."""
    names = [r[0] for r in rows]
    cur.execute(
        "SELECT id, external_id, payload FROM items WHERE gallery_id = %s"
        " AND external_id = ANY(%s)", (g, names),
    )  # fmt: skip
    cur.fetchall()
    cur.execute(
        "SELECT nextval(pg_get_serial_sequence('items', 'id')) FROM generate_series(1, %s)",
        (len(rows),),
    )
    ids = [i for (i,) in cur.fetchall()]
    body = "".join(
        f"{i}\t{g}\t{e}\t{p}\t{m}\t{v}\t1\t2026-01-01\t2026-01-01\n"
        for i, (e, p, m) in zip(ids, rows, strict=True)
    )
    cur.copy_expert(f"COPY items ({COLUMNS}) FROM STDIN", io.StringIO(body))


def service_rows(g: int, v: int, rows: list[tuple[str, str, str]]) -> list[dict[str, Any]]:
    """The same rows as the service's ingest hands them to `insert_new`."""
    return [
        {"gallery_id": g, "external_id": e, "payload": p, "meta": json.loads(m),
         "vector_version_id": v, "meta_seq": 1}
        for e, p, m in rows
    ]  # fmt: skip


def service_write(ctx: Context, g: int, rows: list[dict[str, Any]]) -> None:
    """The service's write of new items, in a transaction of its own."""
    with ctx.session(write=True) as s:
        got, existing = insert_new(s, g, rows, utcnow())
        s.commit()
    if len(got) != len(rows) or existing:
        raise RuntimeError("the service's write skipped rows that were new")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--database-url", default="postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
    )
    args = parser.parse_args()
    name = f"embcompat_pg_insert_{uuid.uuid4().hex[:8]}"
    admin = create_engine(args.database_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(args.database_url).set(database=name)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            ctx = scale._context(Path(tmp), url.render_as_string(False))
            rate = scale.ingest(ctx, args.n)
            conn = psycopg2.connect(
                host=url.host, port=url.port or 5432, user=url.username, dbname=name
            )
            cur = conn.cursor()
            cur.execute("SELECT id, serving_version_id FROM galleries")
            g, v = cur.fetchone()
            times: dict[str, list[float]] = {"copy": [], "service": []}
            for rep in range(args.repeat):  # interleaved, so drift hits both alike
                raw = _rows(f"copy{rep}-", args.batch)
                t0 = time.perf_counter()
                copy_write(cur, g, v, raw)
                conn.commit()
                times["copy"].append(time.perf_counter() - t0)
                rows = service_rows(g, v, _rows(f"service{rep}-", args.batch))
                t0 = time.perf_counter()
                service_write(ctx, g, rows)
                times["service"].append(time.perf_counter() - t0)
            conn.close()
            ctx.close()
    finally:
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        admin.dispose()
    copy_ms = statistics.median(times["copy"]) * 1e3
    service_ms = statistics.median(times["service"]) * 1e3
    print(f"N={args.n}: ingest through the service {rate:.0f} items/s")
    print_table(
        [{"n": args.n, "batch": args.batch, "copy_ms": copy_ms, "service_ms": service_ms,
          "ratio": service_ms / copy_ms}],
        ["n", "batch", "copy_ms", "service_ms", "ratio"],
    )  # fmt: skip


if __name__ == "__main__":
    main()
