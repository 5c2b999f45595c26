"""Engine and session factory built from a URL (never at import time); the service
`Context` owns its engine and disposes it when closed."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from sqlalchemy import Engine, Select, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

T = TypeVar("T")
WRITER = {"sqlite_begin": "IMMEDIATE"}  # execution options of a session that writes


def make_engine(url: str) -> Engine:
    """An engine for `url`; SQLite gets foreign keys, WAL and a busy timeout.

    On SQLite, a session opened with `WRITER` begins IMMEDIATE (the write lock taken at
    BEGIN, waiting up to the busy timeout): a deferred transaction that read, then
    writes after another writer committed, fails at once with "database is locked"
    instead of waiting, which would turn two concurrent requests into a 5xx. Other
    sessions begin as the driver does, at their first write; readers never wait (WAL)."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn) -> None:  # type: ignore[no-untyped-def]
            # other sessions keep the driver's own begin, just before their first write,
            # so their reads hold no snapshot that a later write would conflict with
            if conn.get_execution_options().get("sqlite_begin") == "IMMEDIATE":
                conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=True)


def row_lock(query: Select[T], session: Session) -> Select[T]:
    """`query` taking row locks where the database has them (PostgreSQL: writers on
    other hosts); SQLite serialises its writers already."""
    bind = session.bind
    if bind is not None and bind.dialect.name == "postgresql":
        return query.with_for_update()
    return query


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A transaction: committed on success, rolled back on any error."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
