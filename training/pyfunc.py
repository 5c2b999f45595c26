"""A trained image embedder as an MLflow pyfunc: `predict(images)` → embeddings.

The pyfunc takes a list (or array) of 28x28 images and returns (n, dim) L2-normalised
float32 embeddings, so the registry's `encode(items)` interface is the same as for text
models. It is pickled by reference to this module, which ships with embcompat: the
model folder carries weights only, no code of its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np

from embcompat.training.methods import load_model

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
