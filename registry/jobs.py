"""Upgrade jobs as rows: the lookups that the gallery and upgrade services share."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from embcompat.kinds import TERMINAL_STATES, JobState
from embcompat.registry.schema import Job


def active_upgrade(session: Session, gallery_id: int) -> Job | None:
    """The gallery's upgrade that has not ended (done, cancelled or rolled back), if any."""
    return session.scalars(
        select(Job).where(
            Job.gallery_id == gallery_id,
            Job.kind == "upgrade",
            Job.state.not_in([s.value for s in TERMINAL_STATES]),
        )
    ).first()


def last_done_upgrade(session: Session, gallery_id: int) -> Job | None:
    return session.scalars(
        select(Job)
        .where(Job.gallery_id == gallery_id, Job.kind == "upgrade", Job.state == JobState.DONE)
        .order_by(Job.id.desc())
    ).first()
