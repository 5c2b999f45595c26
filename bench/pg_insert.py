"""PostgreSQL item writes at scale: today's lookup + nextval + COPY against one
INSERT ... ON CONFLICT DO NOTHING RETURNING, on a gallery already holding N items.

A fresh database on the server at `--database-url` gets N items ingested through the
service (bench/scale.py's gallery), then, per repetition, two batches of `--batch` new
items are written by raw statements in their own transactions: the service's current
write (ids of existing items looked up, ids drawn from the sequence, rows streamed by
COPY) and the candidate (the unique index answers "exists?" during the insert). Prints
per-batch medians and the candidate's ratio to the current write. The database is
dropped afterwards.

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

COLUMNS = "id, gallery_id, external_id, payload, meta, vector_version_id, meta_seq, created_at, updated_at"  # noqa: E501


def _rows(tag: str, n: int) -> list[tuple[str, str, str]]:
    """(external id, payload, metadata JSON) like bench/scale.py's items."""
    meta = [{"shard": i % 10, "tenant": f"t{i % 1000}", "price": i % 100} for i in range(n)]
    return [(f"{tag}{i}", str(i), json.dumps(m)) for i, m in enumerate(meta)]


def current_write(cur: Any, g: int, v: int, rows: list[tuple[str, str, str]]) -> None:
    """The service's write of new items today (`galleries.items._write_items`)."""
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


def insert_on_conflict(cur: Any, g: int, v: int, rows: list[tuple[str, str, str]]) -> None:
    """The candidate: one statement; rows it skips are the items that already exist."""
    cur.execute(
        "INSERT INTO items (gallery_id, external_id, payload, meta, vector_version_id,"
        " meta_seq, created_at, updated_at)"
        " SELECT %s, e, p, m::json, %s, 1, now(), now()"
        " FROM unnest(%s::text[], %s::text[], %s::text[]) AS u(e, p, m)"
        " ON CONFLICT (gallery_id, external_id) DO NOTHING RETURNING id, external_id",
        (g, v, [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]),
    )
    if len(cur.fetchall()) != len(rows):
        raise RuntimeError("the candidate skipped rows that were new")


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
            ctx.close()
        conn = psycopg2.connect(
            host=url.host, port=url.port or 5432, user=url.username, dbname=name
        )
        cur = conn.cursor()
        cur.execute("SELECT id, serving_version_id FROM galleries")
        g, v = cur.fetchone()
        times: dict[str, list[float]] = {"current": [], "candidate": []}
        for rep in range(args.repeat):  # interleaved, so drift hits both alike
            for label, write in (("current", current_write), ("candidate", insert_on_conflict)):
                t0 = time.perf_counter()
                write(cur, g, v, _rows(f"{label}{rep}-", args.batch))
                conn.commit()
                times[label].append(time.perf_counter() - t0)
        conn.close()
    finally:
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        admin.dispose()
    cur_ms = statistics.median(times["current"]) * 1e3
    cand_ms = statistics.median(times["candidate"]) * 1e3
    print(f"N={args.n}: ingest through the service {rate:.0f} items/s")
    print_table(
        [{"n": args.n, "batch": args.batch, "current_ms": cur_ms, "candidate_ms": cand_ms,
          "ratio": cand_ms / cur_ms}],
        ["n", "batch", "current_ms", "candidate_ms", "ratio"],
    )  # fmt: skip


if __name__ == "__main__":
    main()
