"""Adapters as records: what was trained between which versions, its metrics, its gate."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from embcompat.errors import UnknownAdapter
from embcompat.registry.schema import AdapterRow, ModelVersion


def _ref(session: Session, version_id: int) -> str:
    mv = session.get(ModelVersion, version_id)
    return f"{mv.model.name}:{mv.version}" if mv else str(version_id)


def adapter_dict(session: Session, row: AdapterRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "from": _ref(session, row.from_version_id),
        "to": _ref(session, row.to_version_id),
        "kind": row.kind,
        "direction": row.direction,
        "status": row.status,
        "mlflow_model_uri": row.mlflow_model_uri,
        "metrics": dict(row.metrics or {}),
        "created_at": row.created_at.isoformat(),
    }


def list_adapters(session: Session) -> list[dict[str, Any]]:
    return [
        adapter_dict(session, a)
        for a in session.scalars(select(AdapterRow).order_by(AdapterRow.id))
    ]


def get_adapter(session: Session, adapter_id: int) -> dict[str, Any]:
    row = session.get(AdapterRow, adapter_id)
    if row is None:
        raise UnknownAdapter(f"no adapter {adapter_id}", adapter=adapter_id)
    return adapter_dict(session, row)
