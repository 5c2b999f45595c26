"""The distribution installs one namespace: only `embcompat/` in the wheel, every source
module in it, and every module importable by its `embcompat.` name alone."""

from __future__ import annotations

import importlib
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("adapters", "api", "index", "migrations", "registry", "training", "workers")


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
         "-q", "-w", str(out)],
        check=True, capture_output=True,
    )  # fmt: skip
    (wheel,) = out.glob("embcompat-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        return zf.namelist()


def test_the_wheel_holds_only_the_embcompat_package(wheel_names: list[str]) -> None:
    tops = {n.split("/", 1)[0] for n in wheel_names if not n.split("/", 1)[0].endswith(".info")}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"embcompat"}


def test_every_source_module_is_in_the_wheel(wheel_names: list[str]) -> None:
    expected = {f"embcompat/{p.relative_to(ROOT / 'embcompat').as_posix()}"
                for p in (ROOT / "embcompat").rglob("*.py")}  # fmt: skip
    for folder in FOLDERS:
        expected |= {f"embcompat/{folder}/{p.relative_to(ROOT / folder).as_posix()}"
                     for p in (ROOT / folder).rglob("*.py")}  # fmt: skip
    assert expected - set(wheel_names) == set()
    assert "embcompat/migrations/script.py.mako" in wheel_names


def test_every_module_imports_by_its_namespaced_name(wheel_names: list[str]) -> None:
    modules = [
        n.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
        for n in wheel_names
        if n.endswith(".py") and not n.startswith("embcompat/migrations/")
    ]
    for name in sorted(modules):
        importlib.import_module(name)
    assert len(modules) > 50
    bare = [f for f in FOLDERS if f in sys.modules]
    assert bare == [], f"bare top-level modules imported: {bare}"
