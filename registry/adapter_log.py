"""Fitted adapters and binarizers enter the registry here, once for every caller: their
folder (manifest + weights) and plots logged to MLflow with their metrics, registered as
a model version tagged with the versions they map between, and a row in the ledger."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from embcompat.adapters.base import Adapter
from embcompat.adapters.binary import Binarizer
from embcompat.kinds import AdapterStatus
from embcompat.registry.mlflow_registry import MlflowRegistry
from embcompat.registry.records import ModelVersionRecord
from embcompat.registry.schema import AdapterRow


def log_adapter(
    session: Session,
    registry: MlflowRegistry,
    name: str,
    folder: Path,
    adapter: Adapter,
    source: ModelVersionRecord,
    target: ModelVersionRecord,
    metrics: dict[str, float],
    *,
    pairs_hash: str,
    plots: tuple[Path, ...] = (),
) -> AdapterRow:
    """Register the adapter saved in `folder` as `<model>-<name>`; returns its row."""
    tags = {
        "from": source.ref,
        "to": target.ref,
        "direction": adapter.direction,
        "kind": adapter.kind,
        "pairs_hash": pairs_hash,
    }
    uri = registry.log_folder_version(f"{source.model}-{name}", folder, tags, metrics, plots)
    return _row(session, adapter, source, target, uri, metrics, AdapterStatus.TRAINED)


def log_binarizer(
    session: Session,
    registry: MlflowRegistry,
    folder: Path,
    binarizer: Binarizer,
    version: ModelVersionRecord,
    metrics: dict[str, float],
) -> AdapterRow:
    """Register a space's binarizer as `<model>-binarizer`, beside the adapters."""
    tags = {
        "from": version.ref,
        "to": f"{binarizer.kind}:{binarizer.bits}bits",
        "direction": binarizer.direction,
        "kind": binarizer.kind,
        "bits_per_dim": str(binarizer.bits_per_dim),
    }
    uri = registry.log_folder_version(f"{version.model}-binarizer", folder, tags, metrics)
    return _row(session, binarizer, version, version, uri, metrics, AdapterStatus.ACCEPTED)


def _row(
    session: Session,
    adapter: Adapter,
    source: ModelVersionRecord,
    target: ModelVersionRecord,
    uri: str,
    metrics: dict[str, Any],
    status: AdapterStatus,
) -> AdapterRow:
    row = AdapterRow(
        from_version_id=source.id,
        to_version_id=target.id,
        kind=adapter.kind,
        direction=adapter.direction,
        mlflow_model_uri=uri,
        metrics=metrics,
        status=status,
    )
    session.add(row)
    session.flush()
    return row
