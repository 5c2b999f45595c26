"""An admin token manages models; it does not run code on the host. A model folder whose
loader would write a marker file is registered from outside the roots (absolute, `..`,
an escaping symlink, a path that does not exist), and from inside them without the
opt-in: every request is refused, the marker never appears, and the refusal reads the
same whether the path exists or not. The operator's opt-in lets it load."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from embcompat.api.app import create_app
from embcompat.service import migrate
from embcompat.settings import Settings
from tests.api.conftest import ADMIN, TOKENS

LOADER = """
from pathlib import Path
Path({marker!r}).write_text("the loader ran")


class Model:
    def predict(self, items, params=None):
        import numpy as np
        return np.ones((len(items), 8), np.float32)


def _load_pyfunc(path):
    return Model()
"""


def code_model(folder: Path, marker: Path) -> Path:
    """An MLflow pyfunc whose loader module, shipped in its `code/` folder, writes
    `marker` when imported."""
    module = f"marker_{uuid.uuid4().hex[:8]}"
    (folder / "code").mkdir(parents=True)
    (folder / "code" / f"{module}.py").write_text(LOADER.format(marker=str(marker)))
    (folder / "MLmodel").write_text(
        "flavors:\n  python_function:\n    code: code\n"
        f"    loader_module: {module}\n    python_version: 3.11.7\n"
    )
    return folder


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(root, outside model, marker): the roots hold one folder; the model is beside it."""
    root = tmp_path / "roots"
    root.mkdir()
    marker = tmp_path / "marker.txt"
    outside = code_model(tmp_path / "elsewhere" / "model", marker)
    return root, outside, marker


def client(tmp_path: Path, root: Path, allow_code: bool = False) -> TestClient:
    settings = Settings(
        data_dir=tmp_path / "data", api_tokens=TOKENS, model_roots=[root],
        allow_code_models=allow_code,
    )  # fmt: skip
    migrate.upgrade(settings.resolved_database_url)
    return TestClient(create_app(settings))


def register(c: TestClient, location: str, source: str = "mlflow", version: str = "v1") -> dict:
    body = {"version": version, "dim": 8, "source": source, "location": location}
    response = c.post("/models/m/versions", headers=ADMIN, json=body)
    return {"status": response.status_code, **response.json()}


def test_locations_outside_the_roots_are_refused_alike(tmp_path: Path, setup: tuple) -> None:
    root, outside, marker = setup
    (root / "escape").symlink_to(outside)
    attempts = {
        "absolute": str(outside),
        "file URI": outside.as_uri(),
        "dot-dot": f"{root}/../elsewhere/model",
        "symlink that escapes": str(root / "escape"),
        "does not exist": str(tmp_path / "nothing" / "here"),
        "system folder": "/etc",
        "remote store": "s3://bucket/model",
    }
    with client(tmp_path, root, allow_code=True) as c:  # the opt-in does not widen roots
        answers = {
            name: register(c, loc, source)
            for name, loc in attempts.items()
            for source in ("mlflow", "dir")
        }
    assert {a["status"] for a in answers.values()} == {403}, answers
    assert {a["code"] for a in answers.values()} == {"untrusted_model"}
    assert len({a["detail"] for a in answers.values()}) == 1  # says nothing about existence
    assert all(str(tmp_path) not in str(a) for a in answers.values())
    assert not marker.exists()


def test_a_model_that_runs_code_needs_the_opt_in(tmp_path: Path, setup: tuple) -> None:
    root, _, marker = setup
    inside = code_model(root / "model", marker)
    with client(tmp_path, root) as c:
        refused = register(c, str(inside))
        assert c.get("/models/versions", headers=ADMIN).json() == []
    assert refused["status"] == 403 and refused["code"] == "untrusted_model"
    assert "runs Python code" in refused["detail"]
    assert "EMBCOMPAT_ALLOW_CODE_MODELS" in refused["hint"]
    assert not marker.exists()

    with client(tmp_path, root, allow_code=True) as c:
        accepted = register(c, str(inside))
    assert accepted["status"] == 201, accepted
    assert marker.read_text() == "the loader ran"  # the operator chose this


def test_models_embcompat_logged_load_and_tampering_is_caught(tmp_path: Path) -> None:
    """Models logged through embcompat (their digests recorded) load under the default
    roots and policy; a file changed afterwards makes the model refuse to load."""
    from embcompat.errors import UntrustedModel
    from embcompat.registry import versions
    from embcompat.registry.trust import local_dir
    from embcompat.service.context import Context
    from tests.service.hash_models import register_hash_pair

    # the operator's roots add to the service's own folders, they do not replace them
    settings = Settings(data_dir=tmp_path / "data", model_roots=[tmp_path / "elsewhere"])
    migrate.upgrade(settings.resolved_database_url)
    with Context(settings) as ctx:
        register_hash_pair(ctx)
        with ctx.session() as s:
            v1 = versions.get_version(s, ctx.registry, "hash", "v1")
            v2 = versions.get_version(s, ctx.registry, "hash", "v2")
        assert v1.code_sha256 is not None
        assert ctx.encoder(v1).encode(["a b"]).shape == (1, 16)
        folder = local_dir(v2.encoder_uri, ctx.registry.tracking_uri)
        assert folder.is_relative_to(settings.resolved_data_dir / "mlartifacts")
        (folder / "python_model.pkl").write_bytes(b"not what was logged")
        with pytest.raises(UntrustedModel, match="files changed"):
            ctx.encoder(v2)


ST_CODE = {
    "a module of its own": lambda st, module: (
        (st / "modules.json").write_text(
            json.dumps([{"idx": 0, "name": "0", "path": "", "type": f"{module}.Layer"}])
        ),
        (st / f"{module}.py").write_text("raise SystemExit('never imported')"),
    ),
    "pickled weights": lambda st, module: (st / "pytorch_model.bin").write_bytes(b"pickle"),
    "unpickling switched on": lambda st, module: (st / "sentence_bert_config.json").write_text(
        json.dumps({"model_args": {"weights_only": False}})
    ),
    "remote code switched on": lambda st, module: (st / "config.json").write_text(
        json.dumps({"auto_map": {"AutoModel": f"{module}.Model"}})
    ),
}


@pytest.mark.parametrize("trick", ST_CODE)
def test_a_sentence_transformer_that_carries_code_needs_the_opt_in(
    tmp_path: Path, setup: tuple, trick: str
) -> None:
    """MLflow's sentence-transformers loader trusts remote code, and transformers
    unpickles `.bin` weights when asked: a folder with any file but data counts as code."""
    root, _, marker = setup
    model = root / "st"
    st = model / "model.sentence_transformer"
    st.mkdir(parents=True)
    (model / "MLmodel").write_text(
        "flavors:\n  sentence_transformers:\n    sentence_transformers_version: 6.2.0\n"
    )
    (st / "modules.json").write_text(json.dumps(
        [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]
    ))  # fmt: skip
    ST_CODE[trick](st, f"modeling_{uuid.uuid4().hex[:8]}")
    with client(tmp_path, root) as c:
        for source, location in (("mlflow", model), ("dir", st)):
            refused = register(c, str(location), source)
            assert refused["status"] == 403 and refused["code"] == "untrusted_model", refused
    assert not marker.exists()
