"""Registration reports agree with the gate: a version the labelled probe shows to be
a downgrade is reported as refused, never with an expected R@10; and a standalone
adapter fit never takes an upgrade job's gate verdict."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pytest

from embcompat.client import Local
from embcompat.errors import InvalidInput
from embcompat.registry import versions
from embcompat.registry.schema import AdapterRow
from embcompat.service import galleries, reports, upgrade
from embcompat.service.adapters import fit_standalone
from embcompat.service.context import Context
from embcompat.settings import Settings

TEXTS = [f"a{n} b{n % 13} c{n % 17} d{n}" for n in range(300)]


class WordBlind(mlflow.pyfunc.PythonModel):  # type: ignore[misc,name-defined]
    """A v2 that ignores the words a text shares with others: a downgrade."""

    def predict(self, context: Any, model_input: Any, params: Any = None) -> np.ndarray:
        if hasattr(model_input, "iloc"):
            model_input = model_input.iloc[:, 0].tolist()
        out = np.array([
            np.random.default_rng(int.from_bytes(
                hashlib.blake2b(str(t).encode(), digest_size=8).digest(), "little"
            )).standard_normal(16)
            for t in model_input
        ])  # fmt: skip
        return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture
def ctx(hash_dir: Path, tmp_path: Path) -> Iterator[Context]:
    shutil.copytree(hash_dir, tmp_path / "data")
    with Context(Settings(data_dir=tmp_path / "data")) as context:
        galleries.create_gallery(context, "g", "hash", "v1")
        galleries.ingest(context, "g", [galleries.ItemIn(f"i{n}", t) for n, t in enumerate(TEXTS)])
        yield context


def test_a_downgrade_on_the_stored_probe_is_reported_as_refused(ctx: Context) -> None:
    with ctx.registry.run("log hash:blind", {}):
        info = ctx.registry.mlflow.pyfunc.log_model(
            name="encoder", python_model=WordBlind(), pip_requirements=["numpy"]
        )
    with ctx.session() as s:
        versions.register_version(
            s, ctx.registry, model="hash", version="blind", dim=16, source="mlflow",
            location=info.model_uri, parent="v1", models_dir=ctx.models_dir,
            policy=ctx.model_policy, logged_here=True,
        )  # fmt: skip
    galleries.set_probe(ctx, "g", [{"text": f"d{n} a{n}", "relevant": [f"i{n}"]}
                                   for n in range(0, 300, 2)])  # fmt: skip
    assert reports.request_report(ctx, "hash", "blind")
    assert reports.run_report(ctx, "hash", "blind") == "done"
    g = reports.get_report(ctx, "hash", "blind")["galleries"]["g"]
    assert g["labelled"]["downgrade"] and g["plan"] is None and g["expected_r10"] is None
    assert "the gate would refuse" in g["reason"]
    job = upgrade.start_upgrade(ctx, "g", "hash", "blind", "auto", pairs=300)
    assert upgrade.run_in_process(ctx, job.id).state == "failed"  # as the report said


def test_a_standalone_fit_never_takes_the_jobs_gate_verdict(ctx: Context) -> None:
    job = upgrade.start_upgrade(ctx, "g", "hash", "v2", "auto", pairs=300)
    upgrade.step_pair(ctx, job.id)
    upgrade.step_train(ctx, job.id)
    fit_standalone(ctx, "hash", "v1", "v2", kinds=("procrustes",), texts=TEXTS[:100])
    upgrade.step_gate(ctx, job.id)
    bridge_id = upgrade.get_job(ctx, job.id).report["adapters"]["bridge"]["id"]
    with ctx.session() as s:
        rows = {r.id: r for r in s.query(AdapterRow).filter_by(direction="query: new->old")}
    assert rows[bridge_id].status in ("accepted", "refused") and "plan" in rows[bridge_id].metrics
    others = [r for i, r in rows.items() if i != bridge_id]
    assert others and all(r.status == "trained" and "plan" not in r.metrics for r in others)


def test_local_actions_that_fail_are_audited_as_failures_and_bad_input_is_refused(
    ctx: Context,
) -> None:
    local = Local(ctx)
    with pytest.raises(InvalidInput, match="kind"):
        local.fit_adapter({"model": "hash", "old_version": "v1", "new_version": "v2",
                           "kind": "bogus", "gallery": "g"})  # fmt: skip
    with pytest.raises(InvalidInput, match="probe query 0"):
        local.set_probe("g", [["not", "an", "object"]])  # type: ignore[list-item]
    events = [(e["action"], e["status"]) for e in local.audit(0, 10, None)]
    assert ("fit_adapter", 422) in events and ("set_probe", 422) in events
