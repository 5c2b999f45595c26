"""Encoders: `encode(items) -> (n, dim) float32`, batched, one interface for every source.

A model version's encoder is loaded from its MLflow model URI (sentence-transformers
flavour or pyfunc), from a sentence-transformers directory, or from a shipped ONNX file.
Loaded encoders are cached per source so a serving process keeps them warm.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from embcompat.arrays import FloatArray, l2_normalize
from embcompat.errors import DimensionMismatch, EncoderError

EXTERNAL = "external"


def hub_offline() -> None:
    """Models ship inside packages: never reach for a hub, and keep tokenizers from
    forking threads under Celery. Set before the first transformers import."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class Encoder(Protocol):
    dim: int

    def encode(self, items: Sequence[Any], batch_size: int = 64) -> FloatArray:
        """items: n texts (or arrays) → (n, dim) float32."""
        ...


class SentenceTransformerEncoder:
    """Wraps a loaded SentenceTransformer; normalizes when the version says so."""

    def __init__(self, model: Any, normalize: bool = True) -> None:
        self.model = model
        self.normalize = normalize
        self.dim = int(model.get_embedding_dimension())
        self._lock = threading.Lock()  # torch modules are not re-entrant across threads

    @classmethod
    def from_dir(cls, path: Path, normalize: bool = True) -> SentenceTransformerEncoder:
        hub_offline()
        from sentence_transformers import SentenceTransformer

        try:
            model = SentenceTransformer(str(path), device="cpu", trust_remote_code=False)
        except Exception as exc:  # translated at this edge
            raise EncoderError(
                "the location holds no loadable sentence-transformers model",
                hint=type(exc).__name__,
                field="location",
            ) from exc
        return cls(model, normalize)

    def encode(self, items: Sequence[Any], batch_size: int = 64) -> FloatArray:
        if len(items) == 0:
            return np.zeros((0, self.dim), np.float32)
        with self._lock:
            out = self.model.encode(
                list(items),
                batch_size=batch_size,
                convert_to_numpy=True,
                normalize_embeddings=self.normalize,
                show_progress_bar=False,
            )
        return np.ascontiguousarray(out, dtype=np.float32)


class OnnxEncoder:
    """A BERT-style ONNX export whose pooled sentence embedding is one of its outputs.

    paraphrase-MiniLM-L3-v2 ships as ONNX without a tokenizer; it shares MiniLM-L6's
    vocabulary, so that tokenizer.json is used with truncation at 128 tokens.
    """

    def __init__(
        self, onnx_path: Path, tokenizer_json: Path, output_index: int = 3, max_len: int = 128
    ) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, (os.cpu_count() or 1))
        self.session = ort.InferenceSession(str(onnx_path), opts, ["CPUExecutionProvider"])
        self.tokenizer = Tokenizer.from_file(str(tokenizer_json))
        self.tokenizer.enable_truncation(max_len)
        self.tokenizer.enable_padding()
        self.output_index = output_index
        self.input_names = {i.name for i in self.session.get_inputs()}
        self.dim = int(self.encode(["probe"]).shape[1])

    def encode(self, items: Sequence[Any], batch_size: int = 64) -> FloatArray:
        chunks: list[FloatArray] = []
        for start in range(0, len(items), batch_size):
            enc = self.tokenizer.encode_batch(list(items[start : start + batch_size]))
            feeds = {
                "input_ids": np.array([e.ids for e in enc], np.int64),
                "attention_mask": np.array([e.attention_mask for e in enc], np.int64),
                "token_type_ids": np.array([e.type_ids for e in enc], np.int64),
            }
            feeds = {k: v for k, v in feeds.items() if k in self.input_names}
            out = self.session.run(None, feeds)[self.output_index]
            chunks.append(l2_normalize(np.asarray(out, np.float32)))
        if not chunks:
            return np.zeros((0, getattr(self, "dim", 0)), np.float32)
        return np.concatenate(chunks)


class PyfuncEncoder:
    """An MLflow pyfunc model whose `predict(list)` returns (n, dim) vectors."""

    def __init__(self, model: Any, dim: int, normalize: bool) -> None:
        self.model = model
        self.dim = dim
        self.normalize = normalize

    def encode(self, items: Sequence[Any], batch_size: int = 64) -> FloatArray:
        chunks = [
            np.asarray(self.model.predict(list(items[s : s + batch_size])), np.float32)
            for s in range(0, len(items), batch_size)
        ]
        if not chunks:
            return np.zeros((0, self.dim), np.float32)
        out = np.concatenate(chunks)
        return l2_normalize(out) if self.normalize else out


def probe_item(input_kind: str) -> Any:
    """One item an encoder of this input kind accepts: text, or `image:HxW` (zeros)."""
    if input_kind.startswith("image:"):
        h, w = (int(v) for v in input_kind.removeprefix("image:").split("x"))
        return np.zeros((h, w), np.uint8)
    return "a probe sentence to check the output dimension"


def check_dim(encoder: Encoder, declared: int, what: str, input_kind: str = "text") -> None:
    """Encode a probe and refuse an encoder whose output disagrees with the declared dim."""
    got = encoder.encode([probe_item(input_kind)]).shape[1]
    if got != declared:
        raise DimensionMismatch(
            f"{what} declares dim {declared} but its encoder outputs {got}",
            hint=f"register it with dim={got}",
            field="dim",
        )
