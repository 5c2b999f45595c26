"""Every enumeration of the service, defined once: the ORM, the service layer, the API
schemas, the CLI and the demo import them from here. StrEnum members compare equal to
their strings, so values stored in the DB or sent over JSON need no conversion."""

from __future__ import annotations

from enum import StrEnum


class Metric(StrEnum):
    COSINE = "cosine"
    IP = "ip"
    L2 = "l2"


class SourceKind(StrEnum):
    """Where a model version's encoder comes from."""

    SHIPPED = "shipped"
    DIR = "dir"
    MLFLOW = "mlflow"
    EXTERNAL = "external"


class Alias(StrEnum):
    """MLflow aliases of model versions."""

    SERVING = "serving"
    CANDIDATE = "candidate"


class IndexKind(StrEnum):
    FLAT = "flat"
    IVF = "ivf"
    HNSW = "hnsw"
    IVFPQ = "ivfpq"  # product-quantised codes in memory, floats re-read from disk
    BINARY = "binary"
    BINARY_HNSW = "binary-hnsw"


FLOAT_INDEX_KINDS = (IndexKind.FLAT, IndexKind.IVF, IndexKind.HNSW)


class ServingPlan(StrEnum):
    """How a mixed (mid-upgrade) gallery is searched; DESIGN.md says when each wins."""

    CASCADE = "cascade"
    BRIDGE = "bridge"
    MAPPED = "mapped"
    DUAL = "dual"
    BASIS = "basis"


class UpgradePlan(StrEnum):
    """What an upgrade may ask for: a serving plan, the gate's choice, or plain backfill."""

    AUTO = "auto"
    CASCADE = "cascade"
    BRIDGE = "bridge"
    MAPPED = "mapped"
    DUAL = "dual"
    BASIS = "basis"
    BACKFILL = "backfill"


class Merge(StrEnum):
    """How the scores of two spaces are merged into one ranking."""

    RAW = "raw"
    RRF = "rrf"
    CALIBRATED = "calibrated"
    LEARNED = "learned"


class AdapterStatus(StrEnum):
    TRAINED = "trained"
    ACCEPTED = "accepted"
    REFUSED = "refused"
    RETIRED = "retired"


class JobState(StrEnum):
    PLANNED = "planned"
    PAIRING = "pairing"
    TRAINING = "training"
    GATED = "gated"
    SERVING_BRIDGE = "serving_bridge"
    BACKFILLING = "backfilling"
    DONE = "done"
    FAILED = "failed"
    PAUSED = "paused"
    CANCELLED = "cancelled"
    ROLLED_BACK = "rolled_back"


TERMINAL_STATES = frozenset({JobState.DONE, JobState.CANCELLED, JobState.ROLLED_BACK})
# A gallery has at most one job in these states (a unique index in the DB says so); a
# failed job waits for resume, cancel or rollback without blocking a new upgrade.
ACTIVE_STATES = frozenset(set(JobState) - TERMINAL_STATES - {JobState.FAILED})
SERVING_STATES = frozenset({JobState.SERVING_BRIDGE, JobState.BACKFILLING})


class ChunkState(StrEnum):
    PENDING = "pending"
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
