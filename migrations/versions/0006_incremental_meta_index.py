"""the write stamp of each item and a log of deleted items, so the metadata index is
brought up to date with the items written since it was built instead of rebuilt

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-28 01:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("items") as batch:
        batch.add_column(
            sa.Column("meta_seq", sa.Integer(), nullable=False, server_default=sa.text("0"))
        )
        batch.create_index("ix_items_gallery_meta_seq", ["gallery_id", "meta_seq"])
    op.create_table(
        "item_deletions",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column(
            "gallery_id",
            sa.Integer(),
            sa.ForeignKey("galleries.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("item_id", sa.Integer(), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
    )
    op.create_index("ix_item_deletions_gallery_seq", "item_deletions", ["gallery_id", "seq"])


def downgrade() -> None:
    op.drop_index("ix_item_deletions_gallery_seq", "item_deletions")
    op.drop_table("item_deletions")
    with op.batch_alter_table("items") as batch:
        batch.drop_index("ix_items_gallery_meta_seq")
        batch.drop_column("meta_seq")
