"""Alembic: upgrade, downgrade, upgrade again, and the ORM matches the migrated schema."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from embcompat.registry.db import make_engine
from embcompat.registry.schema import Base
from embcompat.service import migrate


def _roundtrip_and_diff(url: str) -> list:
    migrate.upgrade(url)
    migrate.downgrade(url, "base")
    engine = make_engine(url)
    try:
        tables = set(inspect(engine).get_table_names()) - {"alembic_version"}
        assert tables == set(), f"downgrade left tables behind: {tables}"
        migrate.upgrade(url)
        with engine.connect() as conn:
            mc = MigrationContext.configure(conn, opts={"compare_type": True})
            return compare_metadata(mc, Base.metadata)
    finally:
        engine.dispose()


def test_sqlite_migrations_roundtrip_without_diff(tmp_path: Path) -> None:
    diff = _roundtrip_and_diff(f"sqlite:///{tmp_path / 'm.db'}")
    assert diff == []


@pytest.mark.integration
def test_postgres_migrations_roundtrip_without_diff(pg_url: str) -> None:
    diff = _roundtrip_and_diff(pg_url)
    assert diff == []
    engine = make_engine(pg_url)
    tables = set(inspect(engine).get_table_names())
    engine.dispose()
    assert {"model_versions", "items", "jobs", "job_chunks", "adapters", "galleries"} <= tables
