"""The audit trail: one row per admin action, who did it (the token's name), and how it
ended. Rows are only ever added; `GET /audit` and `embcompat audit` page through them."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from embcompat.registry.schema import AuditEvent


def record_event(
    session: Session,
    *,
    actor: str,
    action: str,
    method: str,
    path: str,
    status: int,
    request_id: str,
    detail: dict[str, Any],
) -> None:
    session.add(
        AuditEvent(
            actor=actor,
            action=action,
            method=method,
            path=path,
            status=status,
            request_id=request_id,
            detail=detail,
        )  # fmt: skip
    )


def list_events(
    session: Session, after: int = 0, limit: int = 100, actor: str | None = None
) -> list[dict[str, Any]]:
    """Events with id > `after`, oldest first: page on with the last id returned."""
    query = select(AuditEvent).where(AuditEvent.id > after)
    if actor is not None:
        query = query.where(AuditEvent.actor == actor)
    rows = session.scalars(query.order_by(AuditEvent.id).limit(limit))
    return [
        {
            "id": r.id,
            "at": r.at.isoformat(),
            "actor": r.actor,
            "action": r.action,
            "method": r.method,
            "path": r.path,
            "status": r.status,
            "request_id": r.request_id,
            "detail": r.detail,
        }
        for r in rows
    ]
