"""Galleries as records: create one over a model version, look them up."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from embcompat.errors import Conflict, InvalidInput
from embcompat.kinds import IndexKind
from embcompat.registry import versions
from embcompat.registry.schema import EmbeddingModel, Gallery, ModelVersion
from embcompat.service.context import Context
from embcompat.service.galleries.layout import get_gallery_row


@dataclass(frozen=True)
class GalleryRecord:
    id: int
    name: str
    model: str
    serving_version: str
    index_kind: str
    plan: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def gallery_record(session: Session, row: Gallery) -> GalleryRecord:
    model = session.get(EmbeddingModel, row.model_id)
    serving = session.get(ModelVersion, row.serving_version_id)
    return GalleryRecord(
        row.id,
        row.name,
        model.name if model else "?",
        serving.version if serving else "?",
        row.index_kind,
        row.plan,
    )


def create_gallery(
    ctx: Context, name: str, model: str, version: str, index_kind: str = IndexKind.FLAT
) -> GalleryRecord:
    if not versions.NAME.fullmatch(name):  # the name is a folder under the data directory
        raise InvalidInput(
            f"gallery name {name!r} is not allowed",
            hint="letters, digits, '.', '_' and '-', starting with a letter or digit",
            field="name",
        )
    with ctx.session(write=True) as s:
        if s.scalars(select(Gallery).where(Gallery.name == name)).first() is not None:
            raise Conflict(f"a gallery named {name!r} already exists", gallery=name)
        if index_kind not in set(IndexKind):
            raise InvalidInput(
                f"unknown index kind {index_kind!r}",
                hint=f"one of {', '.join(IndexKind)}",
                field="index_kind",
            )
        mv = versions.get_version_row(s, model, version)
        row = Gallery(
            name=name, model_id=mv.model_id, serving_version_id=mv.id, index_kind=str(index_kind)
        )
        s.add(row)
        s.flush()
        return gallery_record(s, row)


def get_gallery(ctx: Context, name: str) -> GalleryRecord:
    with ctx.session() as s:
        return gallery_record(s, get_gallery_row(s, name))


def list_galleries(ctx: Context) -> list[GalleryRecord]:
    with ctx.session() as s:
        return [gallery_record(s, g) for g in s.scalars(select(Gallery).order_by(Gallery.name))]
