"""Upgrade jobs as rows: the lookups that the gallery and upgrade services share."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from embcompat.kinds import ACTIVE_STATES, JobState
from embcompat.registry.schema import Job


def active_upgrade(session: Session, gallery_id: int) -> Job | None:
    """The gallery's one active upgrade (neither ended nor failed), if any."""
    return session.scalars(
        select(Job).where(
            Job.gallery_id == gallery_id,
            Job.kind == "upgrade",
            Job.state.in_([s.value for s in ACTIVE_STATES]),
        )
    ).first()


def failed_upgrades(session: Session, gallery_id: int) -> list[Job]:
    return list(
        session.scalars(
            select(Job).where(
                Job.gallery_id == gallery_id, Job.kind == "upgrade", Job.state == JobState.FAILED
            )
        )
    )


def last_done_upgrade(session: Session, gallery_id: int) -> Job | None:
    return session.scalars(
        select(Job)
        .where(Job.gallery_id == gallery_id, Job.kind == "upgrade", Job.state == JobState.DONE)
        .order_by(Job.id.desc())
    ).first()
