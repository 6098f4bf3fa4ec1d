"""pending_postprocessing: succeeded builds whose post-processing is still to do

Written in the transaction that finishes a build, deleted when its outputs are
published to the cache and its closure size recorded; the queue runner retries
what is left (a post-processing attempt that failed, or a runner killed before
it) with back-off.

Revision ID: 7b3e9d2c4a18
Revises: 581d89a96422
Create Date: 2026-12-06 20:00:00.000000+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "7b3e9d2c4a18"
down_revision: str | None = "581d89a96422"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "pending_postprocessing",
        sa.Column("build_id", sa.BigInteger(), nullable=False),
        sa.Column("since", sa.DateTime(timezone=True), server_default=sa.text("now()"),
                  nullable=False),
        sa.Column("attempts", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("not_before", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["build_id"], ["builds.id"], ondelete="CASCADE",
                                name=op.f("fk_pending_postprocessing_build_id_builds")),
        sa.PrimaryKeyConstraint("build_id", name=op.f("pk_pending_postprocessing")),
    )
    op.create_index("ix_pending_postprocessing_not_before", "pending_postprocessing",
                    ["not_before"])


def downgrade() -> None:
    op.drop_table("pending_postprocessing")
