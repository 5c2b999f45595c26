"""one active upgrade per gallery, enforced by a partial unique index

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27 20:00:00

Galleries that already have several active upgrades (possible before this revision)
keep the newest; the others are cancelled with an error saying why.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# frozen here: a migration must not change when the code's states do
ACTIVE = ("backfilling", "gated", "pairing", "paused", "planned", "serving_bridge", "training")
WHERE = sa.text("kind = 'upgrade' AND state IN (" + ", ".join(f"'{s}'" for s in ACTIVE) + ")")


def upgrade() -> None:
    jobs = sa.table(
        "jobs",
        sa.column("id", sa.Integer),
        sa.column("gallery_id", sa.Integer),
        sa.column("kind", sa.String),
        sa.column("state", sa.String),
        sa.column("error", sa.Text),
    )
    conn = op.get_bind()
    rows = conn.execute(
        sa.select(jobs.c.id, jobs.c.gallery_id)
        .where(jobs.c.kind == "upgrade", jobs.c.state.in_(ACTIVE))
        .order_by(jobs.c.id.desc())
    ).all()
    seen: set[int] = set()
    for job_id, gallery_id in rows:
        if gallery_id in seen:
            conn.execute(
                jobs.update()
                .where(jobs.c.id == job_id)
                .values(state="cancelled", error="superseded: a newer upgrade of this gallery")
            )
        seen.add(gallery_id)
    op.create_index(
        "uq_jobs_one_active_upgrade",
        "jobs",
        ["gallery_id"],
        unique=True,
        sqlite_where=WHERE,
        postgresql_where=WHERE,
    )


def downgrade() -> None:
    op.drop_index("uq_jobs_one_active_upgrade", table_name="jobs")
