"""Shared fixtures: real stores in temp dirs, real PostgreSQL databases, shipped models.

Expensive things (loaded models, a registry with both real versions) are built once per
session; everything a test writes lives under its own tmp_path.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from embcompat.service import migrate
from embcompat.service.context import Context
from embcompat.settings import Settings, get_settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PG_ADMIN_URL = os.environ.get(
    "EMBCOMPAT_TEST_PG_ADMIN_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("EMBCOMPAT_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


@pytest.fixture(scope="session", autouse=True)
def _session_model_root(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Tests copy data dirs whose MLflow stores point at the originals' artifacts: every
    temp dir of the session is a model root (trust tests give their own roots)."""
    root = str(tmp_path_factory.getbasetemp())
    os.environ["EMBCOMPAT_MODEL_ROOTS"] = json.dumps([root])


@pytest.fixture(autouse=True)
def _fresh_settings_cache() -> Iterator[None]:
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def make_context(data_dir: Path, database_url: str | None = None) -> Context:
    settings = Settings(data_dir=data_dir, database_url=database_url)
    migrate.upgrade(settings.resolved_database_url)
    return Context(settings)


@pytest.fixture
def ctx(tmp_path: Path) -> Iterator[Context]:
    """A migrated SQLite DB and an MLflow sqlite store, both under tmp_path."""
    with make_context(tmp_path / "data") as context:
        yield context


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A throwaway PostgreSQL database on the real server, dropped afterwards."""
    name = f"embcompat_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        yield url
    finally:
        with admin.connect() as conn:  # FORCE ends the connections tests left open
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the pieces of shipped models are assembled, once per test session."""
    shared = os.environ.get("EMBCOMPAT_TEST_MODELS_DIR")
    return Path(shared) if shared else Path(".embcompat/models").resolve()


@pytest.fixture(scope="session")
def small_real_pair(models_dir: Path) -> dict[str, object]:
    """A small WordNet task embedded by paraphrase-MiniLM-L3 (old) and MiniLM-L6 (new),
    both shipped models; cached on disk between sessions."""
    from embcompat.datasets import cached_encode, wordnet_task
    from embcompat.registry.shipped import MINILM_L6, PARAPHRASE_L3, load_shipped_encoder

    task = wordnet_task(n_queries=300, n_gallery=1500, n_pool=0, seed=7)
    cache = models_dir.parent / "cache" / "embeddings"
    out: dict[str, object] = {"task": task}
    for side, name in (("old", PARAPHRASE_L3), ("new", MINILM_L6)):
        enc = load_shipped_encoder(name, models_dir)
        out[f"q_{side}"] = cached_encode(name, task.queries, enc.encode, cache)
        out[f"g_{side}"] = cached_encode(name, task.gallery, enc.encode, cache)
    return out


def vector_gallery(ctx: Context, name: str, dim: int, index_kind: str = "flat") -> None:
    """A gallery of an external model `vec:v1` of `dim`: clients send its vectors."""
    from embcompat.registry import versions
    from embcompat.service import galleries

    with ctx.session() as s:
        versions.register_version(
            s, ctx.registry, model="vec", version="v1", dim=dim, source="external",
            models_dir=ctx.data_dir / "models",
            policy=ctx.model_policy,
        )  # fmt: skip
    galleries.create_gallery(ctx, name, "vec", "v1", index_kind=index_kind)  # type: ignore[arg-type]


def register_pair(ctx: Context, models_dir: Path) -> None:
    """text:v1 = all-MiniLM-L6-v2 (384, serving), text:v2 = all-mpnet-base-v2 (768)."""
    from embcompat.demo import register_text_pair

    register_text_pair(ctx, models_dir)


@pytest.fixture(scope="session")
def text_pair_dir(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Path:
    """A data dir whose SQLite DB and MLflow store hold text:v1 and text:v2, built once;
    tests copy it so that each starts from the same registry."""
    root = tmp_path_factory.mktemp("text-pair") / "data"
    with make_context(root) as ctx:  # closing disposes the engine: SQLite is flushed
        register_pair(ctx, models_dir)
    return root


@pytest.fixture(scope="session")
def hash_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir whose registry holds the tiny deterministic `hash` models (v1, v2 a
    rotation of v1, v2c compatible with v1), built once; tests copy it."""
    from tests.service.hash_models import register_hash_pair

    root = tmp_path_factory.mktemp("hash") / "data"
    with make_context(root) as ctx:
        register_hash_pair(ctx)
    return root


@pytest.fixture
def text_ctx(text_pair_dir: Path, tmp_path: Path) -> Iterator[Context]:
    """A private copy of the two-version registry (DB, MLflow store and artifacts)."""
    import shutil

    dst = tmp_path / "data"
    shutil.copytree(text_pair_dir, dst)
    with Context(Settings(data_dir=dst)) as context:
        yield context


def wordnet_items(n: int, seed: int = 3) -> tuple[list, list[str], list[int]]:
    """n gallery items and their labelled queries (query i is relevant to item relevant[i])."""
    from embcompat.datasets import wordnet_task
    from embcompat.service.galleries import ItemIn

    task = wordnet_task(n_queries=n // 4, n_gallery=n, seed=seed)
    items = [
        ItemIn(id=sid, text=doc) for sid, doc in zip(task.gallery_ids, task.gallery, strict=True)
    ]
    return items, task.queries, [int(r) for r in task.relevant]
