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
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Scope = Literal["read", "admin"]


class ApiToken(BaseModel):
    """A named bearer token: the name is what the audit trail records, never the token."""

    name: str = Field(min_length=1, max_length=100)
    token: SecretStr = Field(min_length=8)
    scopes: list[Scope] = Field(min_length=1)


@dataclass(frozen=True)
class Principal:
    """Who made a request: the token's name and scopes."""

    name: str
    scopes: tuple[Scope, ...]


def _tokens(raw: Any) -> list[ApiToken]:
    """`[{"name", "token", "scopes"}]`, or the older `{token: scopes}` map (named
    `token-1`, `token-2`, ... in the order given, so that no name carries the secret)."""
    if isinstance(raw, str):
        raw = json.loads(raw) if raw.strip() else []
    if isinstance(raw, dict):
        raw = [
            {"name": f"token-{i}", "token": token, "scopes": scopes}
            for i, (token, scopes) in enumerate(raw.items(), 1)
        ]
    tokens = [t if isinstance(t, ApiToken) else ApiToken.model_validate(t) for t in raw or []]
    names = [t.name for t in tokens]
    if len(set(names)) != len(names):
        raise ValueError("every API token needs its own name")
    return tokens


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EMBCOMPAT_", env_file=None, extra="ignore")

    data_dir: Path = Field(default=Path(".embcompat"), description="vectors, indexes, caches")
    database_url: str | None = Field(default=None, description="SQLAlchemy URL; SQLite if unset")
    mlflow_tracking_uri: str | None = Field(default=None, description="sqlite store if unset")
    mlflow_experiment: str = "embcompat"
    broker_url: str | None = Field(default=None, description="Celery broker; in-process if unset")
    result_backend: str | None = None
    queue: str = Field(default="embcompat", description="Celery queue the workers consume")
    api_tokens: list[ApiToken] = Field(
        default_factory=list, description='[{"name", "token", "scopes"}] (or {token: scopes})'
    )
    api_tokens_file: Path | None = Field(
        default=None, description="a JSON file of tokens (a mounted secret), added to api_tokens"
    )
    model_roots: list[Path] | None = Field(
        default=None, description="folders models may be loaded from; default: models, mlartifacts"
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
    keep_alive_s: float = Field(default=5.0, gt=0, description="idle keep-alive connections")
    max_connections: int = Field(default=1000, ge=1, description="503 beyond; uvicorn")
    encode_batch_size: int = Field(default=64, ge=1)
    max_batch_items: int = Field(default=10_000, ge=1)
    cascade_encode_budget: int = Field(default=16, ge=0, description="on-the-fly encodes/query")
    broker_visibility_timeout: int = Field(default=3600, ge=1, description="s before redelivery")

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

    _parse_tokens = field_validator("api_tokens", mode="before")(_tokens)

    @property
    def resolved_model_roots(self) -> list[Path]:
        roots = self.model_roots or [
            self.resolved_data_dir / "models",
            self.resolved_data_dir / "mlartifacts",
        ]
        return [Path(r).expanduser().resolve() for r in roots]

    @cached_property
    def _token_digests(self) -> list[tuple[bytes, Principal]]:
        tokens = list(self.api_tokens)
        if self.api_tokens_file is not None:
            tokens += _tokens(self.api_tokens_file.read_text())
        names = [t.name for t in tokens]
        if len(set(names)) != len(names):
            raise ValueError("every API token needs its own name (environment and file)")
        return [
            (_digest(t.token.get_secret_value()), Principal(t.name, tuple(t.scopes)))
            for t in tokens
        ]

    def principal(self, token: str) -> Principal | None:
        """The token's owner, or None. Compares digests in constant time against every
        configured token, so the time taken says nothing about how much of a token matched."""
        found = None
        given = _digest(token)
        for digest, principal in self._token_digests:
            if hmac.compare_digest(given, digest):
                found = principal
        return found


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings; tests clear the cache after changing the environment."""
    return Settings()
