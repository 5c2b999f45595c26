"""Registering a model trained with `embcompat.training` as a model version.

The version is registered with tags `compatible_with=<old ref>`, `method`, `extra_dims`
and `input=image:28x28`; an upgrade to it from its `compatible_with` version serves the
old gallery through the `basis` plan with no adapter: old vectors zero-padded, new
queries as they are.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from embcompat.kinds import SourceKind
from embcompat.registry import versions
from embcompat.registry.records import ModelVersionRecord
from embcompat.service.context import Context
from embcompat.training.methods import TrainedModel, save_model
from embcompat.training.pyfunc import IMAGE_INPUT, ImageEmbedder


def register_trained(
    ctx: Context,
    model: TrainedModel,
    name: str,
    version: str,
    compatible_with: ModelVersionRecord | None = None,
) -> ModelVersionRecord:
    """Log `model` to MLflow as a pyfunc and register it as `name:version`, with the
    old version it was trained against as parent and `compatible_with` tag."""
    tags = {
        "method": model.method,
        "extra_dims": str(model.extra_dims),
        "input": IMAGE_INPUT,
        **({"compatible_with": compatible_with.ref} if compatible_with else {}),
    }
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "model.pt"
        save_model(model, weights)
        uri = ctx.registry.log_pyfunc(f"log {name}:{version}", ImageEmbedder(), weights, tags)
    with ctx.session() as s:
        return versions.register_version(
            s,
            ctx.registry,
            model=name,
            version=version,
            dim=model.dim,
            source=SourceKind.MLFLOW,
            location=uri,
            parent=compatible_with.version if compatible_with else None,
            models_dir=ctx.models_dir,
            policy=ctx.model_policy,
            tags=tags,
            logged_here=True,
        )
