"""Save an adapter to a folder and load it back, refusing the wrong models.

A folder holds `manifest.json` (schema version, kind, dims, direction, config, the
fingerprints of the source and target model versions, a sha256 per weight) and
`weights.safetensors`. It is written into a temp folder and renamed into place, so a
crash never leaves a half-written adapter.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from embcompat.adapters import adapter_class
from embcompat.adapters.base import Adapter
from embcompat.errors import CorruptArtifact, IncompatibleAdapter

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"


def _sha(arr: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()


def save_adapter(adapter: Adapter, path: Path, source: str, target: str) -> Path:
    """Write `adapter` to folder `path`; `source`/`target` fingerprint the model versions."""
    state = adapter.state_dict()
    arrays = {k: np.ascontiguousarray(v) for k, v in state["arrays"].items()}
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "kind": state["kind"],
        "source_dim": state["source_dim"],
        "target_dim": state["target_dim"],
        "direction": state["direction"],
        "config": state["config"],
        "source": source,
        "target": target,
        "weights": {k: {"sha256": _sha(v), "shape": list(v.shape)} for k, v in arrays.items()},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        save_file(arrays, str(tmp / WEIGHTS))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest: dict[str, Any] = json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise CorruptArtifact(f"adapter folder {path} has no readable {MANIFEST}: {exc}") from exc
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise CorruptArtifact(
            f"adapter folder {path} has schema {manifest.get('schema_version')}, "
            f"this release reads {SCHEMA_VERSION}"
        )
    return manifest


def load_adapter(path: Path, source: str | None = None, target: str | None = None) -> Adapter:
    """Load the adapter in `path`; refuse it if it was fitted for other model versions."""
    manifest = read_manifest(path)
    for side, expected in (("source", source), ("target", target)):
        if expected is not None and manifest[side] != expected:
            raise IncompatibleAdapter(
                f"adapter in {path} maps {manifest['source']} -> {manifest['target']}, "
                f"but its {side} should be {expected}",
                hint="train an adapter for this pair of versions",
            )
    try:
        arrays = load_file(str(Path(path) / WEIGHTS))
    except Exception as exc:  # safetensors raises its own error types
        raise CorruptArtifact(f"adapter weights in {path} are unreadable: {exc}") from exc
    for name, meta in manifest["weights"].items():
        if name not in arrays or _sha(arrays[name]) != meta["sha256"]:
            raise CorruptArtifact(f"adapter weight {name!r} in {path} fails its checksum")
    state = {**manifest, "arrays": arrays}
    return adapter_class(manifest["kind"]).from_state_dict(state)
