"""Alembic environment: the URL comes from the caller (embcompat.migrate) or settings."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from embcompat.registry.db import make_engine
from embcompat.registry.schema import Base
from embcompat.settings import get_settings

config = context.config
target_metadata = Base.metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        compare_type=True,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    url = config.get_main_option("sqlalchemy.url") or get_settings().resolved_database_url
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            _run(connection)
            connection.commit()
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise SystemExit(
        "offline (SQL script) migrations are not supported; run `embcompat db upgrade`"
    )
run_migrations_online()
