"""One typed settings object, read from `EMBCOMPAT_*` environment variables.

Embedded defaults need no server: a SQLite file and a sqlite-backed MLflow store under
the data directory, and Celery tasks run in-process (no broker). Nothing is built at
import time: call `get_settings()`.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

Scope = Literal["read", "admin"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EMBCOMPAT_", env_file=None, extra="ignore")

    data_dir: Path = Field(default=Path(".embcompat"), description="vectors, indexes, caches")
    database_url: str | None = Field(default=None, description="SQLAlchemy URL; SQLite if unset")
    mlflow_tracking_uri: str | None = Field(default=None, description="sqlite store if unset")
    mlflow_experiment: str = "embcompat"
    broker_url: str | None = Field(default=None, description="Celery broker; in-process if unset")
    result_backend: str | None = None
    queue: str = Field(default="embcompat", description="Celery queue the workers consume")
    # token -> scopes; e.g. EMBCOMPAT_API_TOKENS='{"s3cret": ["read", "admin"]}'
    api_tokens: dict[str, list[Scope]] = Field(default_factory=dict)
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

    def token_scopes(self, token: SecretStr | str) -> list[Scope]:
        raw = token.get_secret_value() if isinstance(token, SecretStr) else token
        return self.api_tokens.get(raw, [])


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings; tests clear the cache after changing the environment."""
    return Settings()
