"""A trained model in the service: an MLflow pyfunc encoder registered with lineage.

The pyfunc takes a list (or array) of 28x28 images and returns (n, dim) L2-normalised
float32 embeddings, so the registry's `encode(items)` interface is the same as for text
models. The version is registered with tags `compatible_with=<old ref>`, `method`,
`extra_dims` and `input=image:28x28`; an upgrade to it from its `compatible_with`
version serves the old gallery through the `basis` plan with no adapter: old vectors
zero-padded, new queries as they are.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np

from embcompat.context import Context
from embcompat.registry import versions
from embcompat.registry.records import ModelVersionRecord
from embcompat.training.methods import TrainedModel, load_model, save_model

IMAGE_INPUT = "image:28x28"


class ImageEmbedder(mlflow.pyfunc.PythonModel):  # type: ignore[misc,name-defined]
    """pyfunc wrapper: predict(images) → embeddings."""

    def load_context(self, context: Any) -> None:
        import torch

        torch.set_num_threads(1)
        self.model = load_model(Path(context.artifacts["weights"]))

    def predict(self, context: Any, model_input: Any, params: Any = None) -> np.ndarray:
        images = np.asarray(model_input, dtype=np.uint8).reshape(-1, 28, 28)
        return self.model.embed(images)


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
        with ctx.registry.run(f"log {name}:{version}", tags):
            info = ctx.registry.mlflow.pyfunc.log_model(
                name="encoder",
                python_model=ImageEmbedder(),
                artifacts={"weights": str(weights)},
                code_paths=[str(Path(__file__).parent)],
                pip_requirements=["torch==2.13.0", "numpy"],
            )
    with ctx.session() as s:
        return versions.register_version(
            s,
            ctx.registry,
            model=name,
            version=version,
            dim=model.dim,
            source="mlflow",
            location=info.model_uri,
            parent=compatible_with.version if compatible_with else None,
            models_dir=ctx.settings.resolved_data_dir / "models",
            tags=tags,
        )
