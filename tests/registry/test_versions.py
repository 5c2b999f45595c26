"""The registry against a real MLflow store: two real shipped models, aliases, lineage,
encoders, and refused registrations that leave both stores unchanged."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
from sqlalchemy import func, select

from embcompat.errors import DimensionMismatch, DuplicateVersion, EncoderError, UnknownVersion
from embcompat.registry import versions
from embcompat.registry.records import ModelVersionRecord
from embcompat.registry.schema import ModelVersion
from embcompat.registry.shipped import MINILM_L6, MPNET
from embcompat.registry.trust import local_dir, runs_code
from embcompat.service.context import Context
from tests.conftest import make_context

pytestmark = pytest.mark.slow

SENTENCES = [
    "a dog runs across the park",
    "a puppy is running on the grass",
    "the central bank raised interest rates",
]


@pytest.fixture(scope="module")
def reg(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> tuple[Context, Path]:
    """One MLflow store holding text:v1 (MiniLM-L6, 384) and text:v2 (MPNet, 768)."""
    ctx = make_context(tmp_path_factory.mktemp("registry"))
    with ctx.session() as s:
        versions.register_version(
            s,
            ctx.registry,
            model="text",
            version="v1",
            dim=384,
            source="shipped",
            location=MINILM_L6,
            models_dir=models_dir,
            policy=ctx.model_policy,
        )
        versions.register_version(
            s,
            ctx.registry,
            model="text",
            version="v2",
            dim=768,
            source="shipped",
            location=MPNET,
            parent="v1",
            models_dir=models_dir,
            policy=ctx.model_policy,
        )
    return ctx, models_dir


def _register_minilm(ctx: Context, s: Any, models_dir: Path, version: str, dim: int) -> None:
    """Register all-MiniLM-L6-v2 as text:<version> declaring `dim`."""
    versions.register_version(
        s,
        ctx.registry,
        model="text",
        version=version,
        dim=dim,
        source="shipped",
        location=MINILM_L6,
        models_dir=models_dir,
        policy=ctx.model_policy,
    )


def _state(ctx: Context) -> tuple[int, int, dict[str, list[str]]]:
    """(DB rows, MLflow versions, aliases per MLflow version): what a refusal must keep."""
    with ctx.session() as s:
        rows = s.scalar(select(func.count()).select_from(ModelVersion))
    mvs = ctx.registry.versions("text")
    return rows, len(mvs), {m.version: sorted(m.aliases or []) for m in mvs}


def test_versions_are_in_mlflow_with_tags(reg: tuple[Context, Path]) -> None:
    ctx, _ = reg
    mvs = {m.tags["embcompat.version"]: m for m in ctx.registry.versions("text")}
    assert set(mvs) == {"v1", "v2"}
    assert mvs["v1"].tags["dim"] == "384" and mvs["v2"].tags["dim"] == "768"
    assert mvs["v2"].tags["metric"] == "cosine" and mvs["v2"].tags["normalized"] == "true"
    assert mvs["v2"].tags["parent_version"] == "v1"
    folder = local_dir("models:/text/2", ctx.registry.tracking_uri)
    assert "sentence_transformers" in mlflow.models.Model.load(str(folder)).flavors
    assert not runs_code(folder)  # data: it loads without the opt-in
    with ctx.session() as s:
        assert versions.lineage(s, "text", "v2") == ["v1", "v2"]


def test_promote_moves_serving_alias_and_records_replacement(reg: tuple[Context, Path]) -> None:
    ctx, _ = reg
    with ctx.session() as s:
        versions.promote(s, ctx.registry, "text", "v1", "serving")
        versions.promote(s, ctx.registry, "text", "v2", "candidate")
        assert versions.serving_version(s, ctx.registry, "text").version == "v1"
        rec = versions.promote(s, ctx.registry, "text", "v2", "serving")
    assert rec.aliases == ["candidate", "serving"]
    assert ctx.registry.aliases_of("text", "1") == []
    assert ctx.registry.get_version("text", "2").tags["replaces"] == "v1"
    with ctx.session() as s:
        assert versions.serving_version(s, ctx.registry, "text").version == "v2"
        assert versions.get_version(s, ctx.registry, "text", "v2").tags["replaces"] == "v1"


@pytest.mark.parametrize(("version", "dim"), [("v1", 384), ("v2", 768)])
def test_encoders_embed_with_declared_dim_and_unit_norm(
    reg: tuple[Context, Path], version: str, dim: int
) -> None:
    ctx, _ = reg
    with ctx.session() as s:
        rec = versions.get_version(s, ctx.registry, "text", version)
    vecs = ctx.encoder(rec).encode(SENTENCES)
    assert vecs.shape == (3, dim) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    sims = vecs @ vecs.T
    assert sims[0, 1] > sims[0, 2] + 0.2, "paraphrases should sit closer than unrelated text"


def test_duplicate_version_is_refused_and_nothing_changes(reg: tuple[Context, Path]) -> None:
    ctx, models_dir = reg
    before = _state(ctx)
    with pytest.raises(DuplicateVersion, match="'text' already has a version 'v1'"):
        with ctx.session() as s:
            _register_minilm(ctx, s, models_dir, "v1", 384)
    assert _state(ctx) == before


def test_wrong_declared_dim_is_refused_and_nothing_changes(reg: tuple[Context, Path]) -> None:
    ctx, models_dir = reg
    before = _state(ctx)
    with pytest.raises(DimensionMismatch, match="declares dim 768 but its encoder outputs 384"):
        with ctx.session() as s:
            _register_minilm(ctx, s, models_dir, "v3", 768)
    assert _state(ctx) == before


def test_promoting_unknown_version_is_refused_and_nothing_changes(
    reg: tuple[Context, Path],
) -> None:
    ctx, _ = reg
    before = _state(ctx)
    with pytest.raises(UnknownVersion, match="model 'text' has no version 'v9'"):
        with ctx.session() as s:
            versions.promote(s, ctx.registry, "text", "v9")
    assert _state(ctx) == before


def test_external_version_registers_but_cannot_encode(ctx: Context, models_dir: Path) -> None:
    with ctx.session() as s:
        rec = versions.register_version(
            s,
            ctx.registry,
            model="vendor",
            version="2024-06",
            dim=1024,
            source="external",
            models_dir=models_dir,
            policy=ctx.model_policy,
        )
    assert isinstance(rec, ModelVersionRecord) and rec.external
    assert ctx.registry.get_version("vendor", rec.mlflow_version).tags["source"] == "external"
    with pytest.raises(EncoderError, match="vendor:2024-06 is external"):
        ctx.encoder(rec)
