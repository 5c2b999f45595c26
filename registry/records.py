"""Plain records returned by the service layer; ORM rows never leave registry/."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class ModelVersionRecord:
    id: int
    model: str
    version: str
    dim: int
    metric: str
    normalized: bool
    encoder_uri: str
    mlflow_name: str | None
    mlflow_version: str | None
    parent: str | None
    tags: dict[str, Any]
    created_at: datetime
    aliases: list[str] = field(default_factory=list)
    # digest of the model folder when embcompat logged a model that runs code
    code_sha256: str | None = None

    @property
    def external(self) -> bool:
        return self.encoder_uri == "external"

    @property
    def ref(self) -> str:
        """`model:version`, how users name a version."""
        return f"{self.model}:{self.version}"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["created_at"] = self.created_at.isoformat()
        return out
