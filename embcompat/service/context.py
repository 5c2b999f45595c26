"""The service context that the API, the CLI and the workers share: settings, a DB
transaction, the MLflow registry, and the process's warm state (open vector stores,
index searchers, encoders, adapters, the search thread pool). Each is built on first
use, never at import, and released by `close()`: two contexts share nothing."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from numpy._core import multiarray
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from embcompat.errors import DimensionMismatch, ServiceUnavailable
from embcompat.index.store import OpenSpaces
from embcompat.registry import versions
from embcompat.registry.db import WRITER, make_engine, session_scope
from embcompat.registry.encoders import Encoder
from embcompat.registry.mlflow_registry import MlflowRegistry
from embcompat.registry.records import ModelVersionRecord
from embcompat.registry.trust import ModelPolicy
from embcompat.service.health import Health
from embcompat.settings import Settings, get_settings
from embcompat.training.legacy import release_0_1_names

T = TypeVar("T")


class Context:
    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or get_settings()
        # process-wide, like the env var NUMPY_MADVISE_HUGEPAGE, which only acts at import
        multiarray._set_madvise_hugepage(self.settings.numpy_hugepages)  # type: ignore[attr-defined]
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.spaces = OpenSpaces()
        self.health = Health()
        self._cache: dict[tuple[str, Any], Any] = {}
        self._lock = threading.RLock()
        # where an asynchronous read-through sends the items a search touched:
        # (gallery, version id, ids); None: this context's background thread encodes them
        # (the API sets the workers' queue when a broker is configured)
        self.read_through_queue: Callable[[str, int, list[int]], None] | None = None

    @property
    def data_dir(self) -> Path:
        return self.settings.resolved_data_dir

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def model_policy(self) -> ModelPolicy:
        """Where models may be loaded from, and whether code they carry may run."""
        return ModelPolicy(
            tuple(self.settings.resolved_model_roots), self.settings.allow_code_models
        )

    @cached_property
    def engine(self) -> Engine:
        return make_engine(self.settings.resolved_database_url)

    @cached_property
    def _sessions(self) -> sessionmaker[Session]:
        return sessionmaker(bind=self.engine, expire_on_commit=False)

    @cached_property
    def _write_sessions(self) -> sessionmaker[Session]:
        return sessionmaker(bind=self.engine.execution_options(**WRITER), expire_on_commit=False)

    @contextmanager
    def session(self, write: bool = False) -> Iterator[Session]:
        """One DB transaction; an unreachable database becomes a transient error.
        `write`: a transaction that reads then writes where others may write at once
        (SQLite: the write lock from BEGIN on; never open one inside another)."""
        try:
            with session_scope(self._write_sessions if write else self._sessions) as session:
                yield session
        except OperationalError as exc:
            raise ServiceUnavailable(f"database unavailable: {exc.orig}") from exc

    @cached_property
    def registry(self) -> MlflowRegistry:
        return MlflowRegistry(
            self.settings.resolved_mlflow_uri,
            self.settings.mlflow_artifact_root,
            self.settings.mlflow_experiment,
        )

    @cached_property
    def search_pool(self) -> ThreadPoolExecutor:
        """Searches the two spaces of a mixed gallery side by side."""
        return ThreadPoolExecutor(max_workers=2, thread_name_prefix="embcompat-space")

    def cached(self, kind: str, key: Any, build: Callable[[], T]) -> T:
        """The value kept under (kind, key), built once by `build` (encoders, searchers,
        adapters: what the per-request path must not load twice)."""
        with self._lock:
            if (kind, key) not in self._cache:
                self._cache[(kind, key)] = build()
            return self._cache[(kind, key)]  # type: ignore[no-any-return]

    def current(
        self, kind: str, key: Any, stamp: Any, build: Callable[[tuple[Any, T] | None], T]
    ) -> T:
        """The value kept under (kind, key) if it was built for `stamp` (a version, a
        generation), else `build(kept)`, kept in its place: one value per key, never
        stale. `kept` is (stamp, value) of an older stamp, or None: a value that can be
        brought up to date costs what changed, not a rebuild."""
        with self._lock:
            kept = self._cache.get((kind, key))
            if kept is None or kept[0] != stamp:
                kept = self._cache[(kind, key)] = (stamp, build(kept))
            return kept[1]  # type: ignore[no-any-return]

    def forget(self, kind: str, key: Any) -> None:
        with self._lock:
            self._cache.pop((kind, key), None)

    def encoder(self, version: ModelVersionRecord) -> Encoder:
        """The version's encoder, loaded once per context and kept warm (models logged
        by release 0.1 load under that release's module names)."""

        def load() -> Encoder:
            with release_0_1_names():
                return versions.load_encoder(self.registry, self.model_policy, version)

        return self.cached("encoder", version.encoder_uri, load)

    def install_encoder(self, version: ModelVersionRecord, encoder: Encoder) -> None:
        """Use `encoder` for `version` from now on (e.g. one wrapped with a cache of
        vectors computed earlier), checked against the version's dim."""
        if encoder.dim != version.dim:
            raise DimensionMismatch(
                f"{version.ref} has dim {version.dim}, the encoder {encoder.dim}"
            )
        with self._lock:
            self._cache[("encoder", version.encoder_uri)] = encoder

    @cached_property
    def background(self) -> ThreadPoolExecutor:
        """Work after the answer (an asynchronous read-through's encodes), one at a time."""
        return ThreadPoolExecutor(max_workers=1, thread_name_prefix="embcompat-background")

    def close(self) -> None:
        """Release the pools, the engine and every cached object."""
        if "background" in self.__dict__:
            self.background.shutdown(wait=True)  # a write in flight finishes first
        if "search_pool" in self.__dict__:
            self.search_pool.shutdown(wait=False)
        if "engine" in self.__dict__:
            self.engine.dispose()
        with self._lock:
            self._cache.clear()
        self.spaces = OpenSpaces()
        for name in ("engine", "_sessions", "_write_sessions", "search_pool", "background"):
            self.__dict__.pop(name, None)

    def __enter__(self) -> Context:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
