"""One typed settings object, read from `EMBCOMPAT_*` environment variables.

Embedded defaults need no server: a SQLite file and a sqlite-backed MLflow store under
the data directory, and Celery tasks run in-process (no broker). Nothing is built at
import time: call `get_settings()`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PrivateAttr
from pydantic_settings import BaseSettings, SettingsConfigDict

Scope = Literal["read", "admin"]


@dataclass(frozen=True)
class Principal:
    """Who made a request: the token's name and scopes."""

    name: str
    scopes: tuple[Scope, ...]


TokenTable = list[tuple[bytes, Principal]]


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def parse_tokens(raw: Any, where: str) -> TokenTable:
    """`[{"name", "token", "scopes"}]`, or the older `{token: scopes}` map (named
    `token-1`, `token-2`, ... in the order given). Errors name the entry by position and
    name, never by its token: pydantic's would print the value."""
    if raw is None:
        return []
    if isinstance(raw, str):
        try:
            raw = json.loads(raw) if raw.strip() else []
        except ValueError as exc:  # the message holds a position, not the text
            raise ValueError(f"{where} is not JSON: {exc}") from None
    if isinstance(raw, dict):
        raw = [
            {"name": f"token-{i}", "token": token, "scopes": scopes}
            for i, (token, scopes) in enumerate(raw.items(), 1)
        ]
    if not isinstance(raw, list):
        raise ValueError(f"{where} must be a list of {{name, token, scopes}}")
    table: TokenTable = []
    for i, entry in enumerate(raw, 1):
        name = entry.get("name") if isinstance(entry, dict) else None
        what = f"{where}: token #{i}" + (f" ({name!r})" if isinstance(name, str) else "")
        if not isinstance(entry, dict) or set(entry) != {"name", "token", "scopes"}:
            raise ValueError(f"{what} needs exactly the keys name, token and scopes")
        token, scopes = entry["token"], entry["scopes"]
        if not isinstance(name, str) or not 0 < len(name) <= 100:
            raise ValueError(f"{what}: the name must be 1-100 characters")
        if not isinstance(token, str) or len(token) < 8:
            raise ValueError(f"{what}: the token must be a string of 8 or more characters")
        if not isinstance(scopes, list) or not scopes or not set(scopes) <= {"read", "admin"}:
            raise ValueError(f"{what}: scopes must be a non-empty list of 'read', 'admin'")
        table.append((_digest(token), Principal(name, tuple(scopes))))
    return table


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EMBCOMPAT_", env_file=None, extra="ignore")

    data_dir: Path = Field(default=Path(".embcompat"), description="vectors, indexes, caches")
    database_url: str | None = Field(default=None, description="SQLAlchemy URL; SQLite if unset")
    mlflow_tracking_uri: str | None = Field(default=None, description="sqlite store if unset")
    mlflow_experiment: str = "embcompat"
    broker_url: str | None = Field(default=None, description="Celery broker; in-process if unset")
    result_backend: str | None = None
    queue: str = Field(default="embcompat", description="Celery queue the workers consume")
    # raw here, parsed by `tokens()`: pydantic's errors would print the secrets
    api_tokens: Any = Field(
        default=None, repr=False, description='[{"name", "token", "scopes"}] (or {token: scopes})'
    )
    api_tokens_file: Path | None = Field(
        default=None, description="a JSON file of tokens (a mounted secret), added to api_tokens"
    )
    model_roots: list[Path] = Field(
        default_factory=list,
        description="folders models may be loaded from, besides models/ and mlartifacts/",
    )
    allow_code_models: bool = Field(
        default=False, description="load models whose loading runs code they carry (pickles)"
    )
    max_body_bytes: int = Field(default=64 * 2**20, ge=1024, description="413 above this")
    max_search_queries: int = Field(default=256, ge=1, description="texts or vectors per search")
    max_search_hits: int = Field(default=20_000, ge=1, description="queries x k per search")
    max_response_bytes: int = Field(default=16 * 2**20, ge=1024)
    header_timeout_s: float = Field(default=10.0, gt=0, description="to send request headers")
    body_timeout_s: float = Field(default=30.0, gt=0, description="between two body chunks")
    body_deadline_s: float = Field(default=300.0, gt=0, description="to send a whole body")
    keep_alive_s: float = Field(default=5.0, gt=0, description="idle keep-alive connections")
    max_connections: int = Field(default=1000, ge=1, description="503 beyond; uvicorn")
    numpy_hugepages: bool = Field(
        default=False,
        description="let numpy ask the kernel for huge pages (madvise) on large arrays: where "
        "the kernel compacts memory to find them, fresh arrays stall (README, Scale); "
        "process-wide, set by each Context",
    )
    encode_batch_size: int = Field(default=64, ge=1)
    max_batch_items: int = Field(default=10_000, ge=1)
    cascade_encode_budget: int = Field(default=16, ge=0, description="on-the-fly encodes/query")
    cascade_read_through: Literal["sync", "async"] = Field(
        default="sync",
        description="sync: a search encodes its missing candidates before answering; async: "
        "it answers with what is known and queues them for the workers",
    )
    broker_visibility_timeout: int = Field(default=3600, ge=1, description="s before redelivery")
    training_lease_s: int = Field(
        default=900, ge=5, description="s of silence after which a training run is taken over"
    )

    @property
    def resolved_data_dir(self) -> Path:
        return self.data_dir.expanduser().resolve()

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.resolved_data_dir / 'embcompat.db'}"

    @property
    def resolved_mlflow_uri(self) -> str:
        return self.mlflow_tracking_uri or f"sqlite:///{self.resolved_data_dir / 'mlflow.db'}"

    @property
    def mlflow_artifact_root(self) -> str:
        return (self.resolved_data_dir / "mlartifacts").as_uri()

    @property
    def eager_tasks(self) -> bool:
        """No broker configured: run Celery tasks in-process (the embedded default)."""
        return self.broker_url is None

    _token_cache: tuple[Any, TokenTable] | None = PrivateAttr(default=None)

    @property
    def resolved_model_roots(self) -> list[Path]:
        """The service's own folders (it writes them: assembled and logged models) and
        the operator's `model_roots`."""
        own = [self.resolved_data_dir / "models", self.resolved_data_dir / "mlartifacts"]
        return own + [Path(r).expanduser().resolve() for r in self.model_roots]

    def tokens(self) -> TokenTable:
        """(sha256 of the token, its owner) for every configured token. The file is read
        again when it changes, so that removing a token from it revokes the token."""
        path = self.api_tokens_file
        stamp = None
        if path is not None:
            st = path.stat()
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if self._token_cache is not None and self._token_cache[0] == stamp:
            return self._token_cache[1]
        table = parse_tokens(self.api_tokens, "EMBCOMPAT_API_TOKENS")
        if path is not None:
            table += parse_tokens(path.read_text(), "EMBCOMPAT_API_TOKENS_FILE")
        names = [p.name for _, p in table]
        if len(set(names)) != len(names):
            raise ValueError("every API token needs its own name (environment and file)")
        self._token_cache = (stamp, table)
        return table

    def bearer(self, authorization: str) -> Principal | None:
        """The owner of the token in an `Authorization: Bearer <token>` header value."""
        kind, _, token = authorization.partition(" ")
        if kind.lower() != "bearer" or not token.strip():
            return None
        return self.principal(token.strip())

    def principal(self, token: str) -> Principal | None:
        """The token's owner, or None. Compares digests in constant time against every
        configured token, so the time taken says nothing about how much of a token matched."""
        found = None
        given = _digest(token)
        for digest, principal in self.tokens():
            if hmac.compare_digest(given, digest):
                found = principal
        return found


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings; tests clear the cache after changing the environment."""
    return Settings()
