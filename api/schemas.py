"""Request bodies: the HTTP shapes of the service layer's inputs, validated at the edge.

Strict where a coercion would change meaning: `k` is an integer, not "5" or true; vector
components are numbers, not strings or booleans; filter values keep their type (true is
not 1). Text must be storable (no lone surrogate, no NUL) and vectors rectangular; each
refusal is a 422 naming the field."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    model_validator,
)

from embcompat.kinds import IndexKind, Metric, SourceKind, UpgradePlan


def _encodable(value: str) -> str:
    """Text a database can store: valid Unicode (no lone surrogate) and no NUL character,
    which PostgreSQL refuses wherever the text goes (a row, or an id looked up)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"text is not valid Unicode at position {exc.start}") from None
    if "\x00" in value:
        raise ValueError(f"text contains a NUL character at position {value.index(chr(0))}")
    return value


Text = Annotated[StrictStr, AfterValidator(_encodable)]
Number = StrictFloat | StrictInt
MetaValue = Text | StrictInt | StrictFloat | StrictBool
Vector = list[Number]
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
Name = Field(min_length=1, max_length=200, pattern=NAME_PATTERN)


def _rectangular(rows: list[Vector] | None, field: str) -> None:
    if rows and len({len(r) for r in rows}) > 1:
        lengths = sorted({len(r) for r in rows})
        raise ValueError(f"{field}: every vector needs the same length, got {lengths}")


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class VersionIn(Body):
    version: str = Name
    dim: StrictInt = Field(gt=0, le=65536)
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
    id: Text = Field(min_length=1, max_length=500)
    text: Text | None = Field(default=None, max_length=100_000)
    vector: Vector | None = Field(default=None, max_length=65536)
    metadata: dict[Text, MetaValue] | None = Field(default=None, max_length=100)


class ItemsIn(Body):
    items: list[ItemBody] = Field(min_length=1)

    @model_validator(mode="after")
    def _same_dims(self) -> ItemsIn:
        _rectangular([i.vector for i in self.items if i.vector is not None], "items.vector")
        return self


class ItemIdsIn(Body):
    ids: list[Text] = Field(min_length=1, max_length=10_000)


class FilterOps(Body):
    """`{"not": v or [v]}` and numeric bounds `lt`, `lte`, `gt`, `gte` (combinable)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    not_: MetaValue | Annotated[list[MetaValue], Field(max_length=100)] | None = Field(
        default=None, alias="not"
    )
    lt: Number | None = None
    lte: Number | None = None
    gt: Number | None = None
    gte: Number | None = None


Condition = MetaValue | Annotated[list[MetaValue], Field(max_length=100)] | FilterOps


class SearchIn(Body):
    texts: list[Annotated[Text, Field(max_length=10_000)]] | None = Field(
        default=None, min_length=1, max_length=1000
    )
    vectors: list[Annotated[Vector, Field(max_length=65536)]] | None = Field(
        default=None, min_length=1, max_length=1000
    )
    old_vectors: list[Annotated[Vector, Field(max_length=65536)]] | None = Field(
        default=None, min_length=1, max_length=1000
    )
    k: StrictInt = Field(default=10, ge=1, le=1000)
    filters: dict[Text, Condition] | None = Field(
        default=None,
        max_length=20,
        description="item metadata {key: value, [values] or {not, lt, lte, gt, gte}}",
    )

    @model_validator(mode="after")
    def _same_dims(self) -> SearchIn:
        _rectangular(self.vectors, "vectors")
        _rectangular(self.old_vectors, "old_vectors")
        return self

    def filter_dict(self) -> dict[str, Any] | None:
        """The filters as the service takes them (operators as plain objects)."""
        if self.filters is None:
            return None
        return {
            k: v.model_dump(by_alias=True, exclude_none=True) if isinstance(v, FilterOps) else v
            for k, v in self.filters.items()
        }


class ProbeQuery(Body):
    text: Text = Field(min_length=1, max_length=10_000)
    relevant: list[Text] = Field(min_length=1, max_length=1000)


class ProbeIn(Body):
    queries: list[ProbeQuery] = Field(min_length=1, max_length=100_000)


class PairVectors(Body):
    old: list[Vector] = Field(min_length=1, max_length=100_000)
    new: list[Vector] = Field(min_length=1, max_length=100_000)

    @model_validator(mode="after")
    def _shapes(self) -> PairVectors:
        _rectangular(self.old, "vectors.old")
        _rectangular(self.new, "vectors.new")
        return self


class AdapterFitIn(Body):
    """Pairs from exactly one of `gallery` (a sample of its stored texts), `texts`
    (encoded by both versions) or `vectors` (both versions', rows aligned)."""

    model: str = Name
    old_version: str = Name
    new_version: str = Name
    kind: Literal["auto", "procrustes", "affine", "lowrank", "residual_mlp"] = "auto"
    gallery: str | None = Field(default=None, min_length=1, max_length=200)
    texts: list[Annotated[Text, Field(min_length=1, max_length=10_000)]] | None = Field(
        default=None, max_length=100_000
    )
    vectors: PairVectors | None = None
    sample: StrictInt = Field(default=2000, ge=50, le=100_000)


class TrainingIn(Body):
    """A compatible training run: the new `version` of `old`'s model, fine-tuned from
    `base` on exactly one of `pairs` ([query text, relevant item text]) or `gallery`
    (its stored labelled probe and stored item texts)."""

    old: str = Field(min_length=3, max_length=401, pattern=r"^[^:]+:[^:]+$")
    version: str = Name
    base: str = Field(default="all-MiniLM-L6-v2", min_length=1, max_length=401)
    pairs: (
        list[
            Annotated[
                list[Annotated[Text, Field(min_length=1, max_length=10_000)]],
                Field(min_length=2, max_length=2),
            ]
        ]
        | None
    ) = Field(default=None, max_length=500_000)
    gallery: str | None = Field(default=None, min_length=1, max_length=200)
    method: Literal["bct", "bt2", "oca"] = "bt2"
    extra_dims: StrictInt = Field(default=0, ge=0, le=4096)
    weights: dict[Literal["new", "influence", "contrast", "align"], float] | None = Field(
        default=None, description="loss weights overriding the method's, term by term"
    )
    epochs: StrictInt = Field(default=1, ge=1, le=100)
    batch_size: StrictInt = Field(default=64, ge=2, le=4096)
    seed: StrictInt = Field(default=0, ge=0, le=2**31 - 1)


class ScheduleIn(Body):
    max_items_per_hour: StrictInt | None = Field(default=None, ge=1, le=10**9)
    window_start_hour: StrictInt | None = Field(default=None, ge=0, le=23)
    window_end_hour: StrictInt | None = Field(default=None, ge=0, le=23)


class UpgradeIn(Body):
    model: str = Name
    version: str = Name
    plan: UpgradePlan = UpgradePlan.AUTO
    pairs: StrictInt = Field(default=2000, ge=50, le=1_000_000)
    chunk_size: StrictInt = Field(default=1000, ge=1, le=1_000_000)
    probe: list[ProbeQuery] | None = Field(default=None, max_length=100_000)
    schedule: ScheduleIn | None = None
    override: StrictBool = Field(
        default=False,
        description="serve a requested bridge, mapped or basis plan without labels showing "
        "it is no worse than the old model (recorded; searches carry a warning)",
    )
