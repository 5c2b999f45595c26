"""A deterministic tiny text encoder for tests that need many upgrades fast: each word
hashes to a fixed random direction, a text is the normalised sum of its words' directions.
`rotate_to` > dim gives a second version whose space is an exact rotation of the first
into a wider one, so every bridge, mapper and basis can be fitted exactly; with
`keep_head` its first `dim` coordinates are the first version's own (a v2 trained
compatible, served by the `basis` plan)."""

from __future__ import annotations

import hashlib
from typing import Any

import mlflow.pyfunc
import numpy as np

from embcompat.service.context import Context


class HashEncoder(mlflow.pyfunc.PythonModel):  # type: ignore[misc,name-defined]
    def __init__(self, dim: int = 16, rotate_to: int | None = None, keep_head: bool = False):
        self.dim, self.rotate_to, self.keep_head = dim, rotate_to, keep_head
        self.out_dim = rotate_to or dim

    def _word(self, word: str) -> np.ndarray:
        seed = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")
        return np.random.default_rng(seed).standard_normal(self.dim)

    def predict(self, context: Any, model_input: Any, params: Any = None) -> np.ndarray:
        if hasattr(model_input, "iloc"):  # MLflow hands a list of strings over as a frame
            model_input = model_input.iloc[:, 0].tolist()
        out = np.zeros((len(model_input), self.dim))
        for i, text in enumerate(list(model_input)):
            for word in str(text).split():
                out[i] += self._word(word)
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        if self.keep_head:  # compatible: v1's coordinates first, then extra ones
            extra = np.tanh(out @ np.random.default_rng(2).standard_normal((self.dim, 8)))
            out = np.hstack([out, 0.1 * extra])
            out /= np.linalg.norm(out, axis=1, keepdims=True)
        elif self.rotate_to:
            rng = np.random.default_rng(1)
            q, _ = np.linalg.qr(rng.standard_normal((self.rotate_to, self.dim)))
            out = out @ q.T
        return out.astype(np.float32)


def register_hash_pair(ctx: Context, model: str = "hash") -> None:
    """`hash:v1` (16-d) serving and `hash:v2` (24-d, a rotation of v1 into a wider
    space), both MLflow pyfuncs, and `hash:v2c` declared compatible with v1 (basis)."""
    from embcompat.registry import versions

    for version, encoder, tags, parent in (
        ("v1", HashEncoder(16), {}, None),
        ("v2", HashEncoder(16, rotate_to=24), {}, "v1"),
        ("v2c", HashEncoder(16, rotate_to=24, keep_head=True),
         {"compatible_with": f"{model}:v1", "method": "bt2", "extra_dims": "8"}, "v1"),
    ):  # fmt: skip
        with ctx.registry.run(f"log {model}:{version}", {}):
            info = ctx.registry.mlflow.pyfunc.log_model(
                name="encoder", python_model=encoder, pip_requirements=["numpy"]
            )
        with ctx.session() as s:
            versions.register_version(
                s, ctx.registry, model=model, version=version, dim=encoder.out_dim,
                source="mlflow", location=info.model_uri, parent=parent, tags=tags,
                models_dir=ctx.models_dir, policy=ctx.model_policy, logged_here=True,
            )  # fmt: skip
