"""An image pyfunc logged by release 0.1 (top-level `training` package, its code copied
into the model folder) still loads and encodes the same through today's context."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from embcompat.errors import UntrustedModel
from embcompat.registry.records import ModelVersionRecord
from embcompat.service import migrate
from embcompat.service.context import Context
from embcompat.settings import Settings

DATA = Path(__file__).resolve().parent.parent / "data"


def test_a_release_0_1_pyfunc_encodes_as_it_did(tmp_path: Path) -> None:
    """Release 0.1 recorded no digest, so the pyfunc loads only once the operator opts
    in to models that run code (the upgrade note in migration 0004)."""
    settings = Settings(data_dir=tmp_path / "data", model_roots=[DATA])
    migrate.upgrade(settings.resolved_database_url)
    probe = np.load(DATA / "pyfunc-image-v0.1-probe.npz")
    record = ModelVersionRecord(
        id=1, model="fashion", version="v0", dim=probe["embeddings"].shape[1], metric="cosine",
        normalized=True, encoder_uri=str(DATA / "pyfunc-image-v0.1"), mlflow_name=None,
        mlflow_version=None, parent=None, tags={"input": "image:28x28"},
        created_at=datetime.now(UTC),
    )  # fmt: skip
    with Context(settings) as ctx, pytest.raises(UntrustedModel, match="runs Python code"):
        ctx.encoder(record)
    with Context(settings.model_copy(update={"allow_code_models": True})) as ctx:
        got = ctx.encoder(record).encode(list(probe["images"]))
    np.testing.assert_allclose(got, probe["embeddings"], atol=1e-5)
    assert "training" not in sys.modules  # the old names were borrowed, then given back
