"""The upgrade of a gallery from one model version to the next, as a job stored in the
DB: states (`states`), start (`start`), the steps (`pairing`, `fitting`, `gate`,
`backfill`), operators' control (`control`), schedules and one runner."""

from embcompat.service.upgrade.backfill import (
    backfill_chunk,
    chunks_left,
    finalize,
    map_batches,
    map_chunks,
    publish_mapped,
    step_start_backfill,
    warm_active_encoders,
)
from embcompat.service.upgrade.control import (
    CONTROLS,
    cancel,
    fail,
    get_job,
    latest_job,
    pause,
    resume,
    rollback,
)
from embcompat.service.upgrade.fitting import step_train
from embcompat.service.upgrade.gate import step_gate
from embcompat.service.upgrade.jobs import declared_compatible, job_dir, load_platt
from embcompat.service.upgrade.pairing import step_pair
from embcompat.service.upgrade.runner import failing_job, prepare, run_in_process
from embcompat.service.upgrade.schedule import BackfillSchedule, chunks_due
from embcompat.service.upgrade.start import plan_upgrade, start_upgrade
from embcompat.service.upgrade.states import TRANSITIONS, JobRecord, transition

__all__ = [
    "CONTROLS",
    "TRANSITIONS",
    "BackfillSchedule",
    "JobRecord",
    "backfill_chunk",
    "cancel",
    "chunks_due",
    "chunks_left",
    "declared_compatible",
    "fail",
    "failing_job",
    "finalize",
    "get_job",
    "job_dir",
    "latest_job",
    "load_platt",
    "map_batches",
    "map_chunks",
    "publish_mapped",
    "pause",
    "plan_upgrade",
    "prepare",
    "resume",
    "rollback",
    "run_in_process",
    "start_upgrade",
    "step_gate",
    "step_pair",
    "step_start_backfill",
    "step_train",
    "transition",
    "warm_active_encoders",
]
