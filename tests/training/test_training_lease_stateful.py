"""Training runs' leases under random interleavings (hypothesis `RuleBasedStateMachine`):
runs requested, held by a live process, gone silent, finished, handed to a redelivered
task, and scanned by the beat. Invariants, after every step:
- the beat re-sends exactly the pending or running runs with no sign of life for a
  lease, and none twice within one lease;
- a run a live process holds is never taken by a redelivered task, and a done run is
  never re-sent;
- every run reads back `lapsed` exactly when the model says so.
The training itself never starts here: only held, done or lapsed-and-rescanned runs are
handed to `run_training`, which returns before loading anything for those."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, rule

from embcompat.registry import versions
from embcompat.registry.schema import TrainingRun
from embcompat.service import training
from embcompat.service.context import Context
from tests.conftest import make_context

PAIRS = [(f"query {i}", f"item {i}") for i in range(128)]


class LeaseMachine(RuleBasedStateMachine):
    root: Path
    count = 0  # machines built: each gets its own data dir

    runs = Bundle("runs")

    def __init__(self) -> None:
        super().__init__()
        LeaseMachine.count += 1
        self.ctx: Context = make_context(self.root / f"m{LeaseMachine.count}")
        with self.ctx.session() as s:
            versions.register_version(
                s, self.ctx.registry, model="vec", version="v1", dim=4, source="external",
                models_dir=self.ctx.models_dir, policy=self.ctx.model_policy,
            )  # fmt: skip
        self.lease = self.ctx.settings.training_lease_s
        self.state: dict[int, str] = {}  # run -> pending | running | done
        self.silent: dict[int, bool] = {}  # no sign of life for a lease

    def _set(self, run_id: int, state: str, ago_s: float) -> None:
        with self.ctx.session(write=True) as s:
            run = s.get(TrainingRun, run_id)
            assert run is not None
            run.state = state
            run.heartbeat_at = datetime.now(UTC) - timedelta(seconds=ago_s)
        self.state[run_id], self.silent[run_id] = state, ago_s > self.lease

    @rule(target=runs)
    def request(self) -> int:
        run_id = training.request_training(
            self.ctx, old="vec:v1", version=f"c{len(self.state)}", pairs=PAIRS
        )
        self.state[run_id], self.silent[run_id] = "pending", False
        return run_id

    @rule(run_id=runs)
    def held_by_a_live_worker(self, run_id: int) -> None:
        if self.state[run_id] != "done":
            self._set(run_id, "running", 1)

    @rule(run_id=runs, pending=st.booleans())
    def goes_silent(self, run_id: int, pending: bool) -> None:
        if self.state[run_id] != "done":
            self._set(run_id, "pending" if pending else "running", self.lease + 5)

    @rule(run_id=runs)
    def finishes(self, run_id: int) -> None:
        self._set(run_id, "done", 0)

    @rule(run_id=runs)
    def redelivered(self, run_id: int) -> None:
        if self.state[run_id] == "done" or (
            self.state[run_id] == "running" and not self.silent[run_id]
        ):
            out = training.run_training(self.ctx, run_id)
            assert out["state"] == self.state[run_id]  # left to its holder, or done

    @rule()
    def beat(self) -> None:
        expected = {
            r for r, st_ in self.state.items() if st_ in ("pending", "running") and self.silent[r]
        }
        assert set(training.lapsed_runs(self.ctx)) == expected
        for r in expected:
            self.silent[r] = False  # the re-send renewed the lease
        assert training.lapsed_runs(self.ctx) == []  # not twice within one lease

    @invariant()
    def lapsed_reads_back(self) -> None:
        for run_id, state in self.state.items():
            out = training.get_training(self.ctx, run_id)
            assert out["state"] == state
            assert out["lapsed"] == (state != "done" and self.silent[run_id])

    def teardown(self) -> None:
        self.ctx.close()


def test_leases_under_random_interleavings(tmp_path: Path) -> None:
    LeaseMachine.root = tmp_path
    run = LeaseMachine.TestCase
    run.settings = settings(
        max_examples=15,
        stateful_step_count=12,
        deadline=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    run().runTest()
