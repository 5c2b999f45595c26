"""Every adapter kind round-trips through state_dict and a saved folder; loading refuses
the wrong models and corrupt weights; a folder saved by release 0.1 still loads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from embcompat.adapters import KINDS, BasisAdapter
from embcompat.adapters.io import load_adapter, save_adapter
from embcompat.errors import CorruptArtifact, IncompatibleAdapter

LEGACY = Path(__file__).parent.parent / "data" / "adapter-procrustes-v0.1"


def _fit(kind: str, x: np.ndarray, y: np.ndarray):  # type: ignore[no-untyped-def]
    if kind == "basis":
        return BasisAdapter.fit(x, y)
    extra = {"max_steps": 3, "hidden": 16} if kind == "residual_mlp" else {}
    return KINDS[kind].fit(x, y, **extra)  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.normal(size=(200, 12)).astype(np.float32), rng.normal(size=(200, 8)).astype(
        np.float32
    )


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_state_dict_and_folder_round_trip(
    kind: str, data: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    x, y = data
    adapter = _fit(kind, x, y)
    expected = adapter.transform(x[:7])
    again = type(adapter).from_state_dict(adapter.state_dict())
    np.testing.assert_array_equal(again.transform(x[:7]), expected)
    folder = save_adapter(adapter, tmp_path / kind, source="text:v2", target="text:v1")
    loaded = load_adapter(folder, source="text:v2", target="text:v1")
    assert (loaded.kind, loaded.direction) == (adapter.kind, adapter.direction)
    np.testing.assert_array_equal(loaded.transform(x[:7]), expected)


def test_loading_against_other_models_is_refused(
    data: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    x, y = data
    folder = save_adapter(KINDS["procrustes"].fit(x, y), tmp_path / "a", "text:v2", "text:v1")  # type: ignore[attr-defined]
    with pytest.raises(IncompatibleAdapter, match="maps text:v2 -> text:v1, but its target"):
        load_adapter(folder, source="text:v2", target="text:v0")


def test_tampered_weights_are_refused(data: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    x, y = data
    folder = save_adapter(KINDS["affine"].fit(x, y), tmp_path / "a", "s", "t")  # type: ignore[attr-defined]
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["weights"]["weight"]["sha256"] = "0" * 64
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptArtifact, match="'weight' .* fails its checksum"):
        load_adapter(folder)
    (folder / "weights.safetensors").write_bytes(b"garbage")
    with pytest.raises(CorruptArtifact, match="unreadable"):
        load_adapter(folder)


def test_folder_saved_by_release_0_1_still_loads() -> None:
    adapter = load_adapter(LEGACY, source="legacy:new", target="legacy:old")
    probe = np.load(LEGACY.parent / "adapter-procrustes-v0.1-probe.npz")
    np.testing.assert_allclose(adapter.transform(probe["x"]), probe["y"], atol=1e-6)
