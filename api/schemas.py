"""Request bodies: the HTTP shapes of the service layer's inputs, validated at the edge."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from embcompat.kinds import IndexKind, Metric, SourceKind, UpgradePlan

Name = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class VersionIn(Body):
    version: str = Name
    dim: int = Field(gt=0, le=65536)
    source: SourceKind
    location: str | None = Field(default=None, max_length=1000)
    metric: Metric = Metric.COSINE
    parent: str | None = Field(default=None, max_length=200)


class GalleryIn(Body):
    name: str = Name
    model: str = Name
    version: str = Name
    index_kind: IndexKind = IndexKind.FLAT


class ItemBody(Body):
    id: str = Field(min_length=1, max_length=500)
    text: str | None = Field(default=None, max_length=100_000)
    vector: list[float] | None = Field(default=None, max_length=65536)
    metadata: dict[str, str | int | float | bool] | None = Field(default=None, max_length=100)


class ItemsIn(Body):
    items: list[ItemBody] = Field(min_length=1)


class ItemIdsIn(Body):
    ids: list[str] = Field(min_length=1, max_length=10_000)


class SearchIn(Body):
    texts: list[str] | None = Field(default=None, min_length=1, max_length=1000)
    vectors: list[list[float]] | None = Field(default=None, min_length=1, max_length=1000)
    old_vectors: list[list[float]] | None = Field(default=None, min_length=1, max_length=1000)
    k: int = Field(default=10, ge=1, le=1000)
    filters: dict[str, str | int | float | bool | list[str | int | float | bool]] | None = Field(
        default=None, max_length=20, description="item metadata {key: value or [values]}"
    )


class ProbeQuery(Body):
    text: str = Field(min_length=1, max_length=10_000)
    relevant: list[str] = Field(min_length=1, max_length=1000)


class ScheduleIn(Body):
    max_items_per_hour: int | None = Field(default=None, ge=1, le=10**9)
    window_start_hour: int | None = Field(default=None, ge=0, le=23)
    window_end_hour: int | None = Field(default=None, ge=0, le=23)


class UpgradeIn(Body):
    model: str = Name
    version: str = Name
    plan: UpgradePlan = UpgradePlan.AUTO
    pairs: int = Field(default=2000, ge=50, le=1_000_000)
    chunk_size: int = Field(default=1000, ge=1, le=1_000_000)
    probe: list[ProbeQuery] | None = Field(default=None, max_length=100_000)
    schedule: ScheduleIn | None = None
