"""channels: automatic mode (follow the newest good evaluation), aggregate job, moved_at

Revision ID: 3c4f1a9e2b7d
Revises: 3c9e1f0a7b42
Create Date: 2026-12-06 03:40:00.000000+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "3c4f1a9e2b7d"
down_revision: str | None = "3c9e1f0a7b42"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("channels", sa.Column(
        "mode", sa.Enum("manual", "automatic", name="channel_mode", native_enum=False,
                        create_constraint=True, length=32),
        server_default="manual", nullable=False))
    op.add_column("channels", sa.Column("aggregate_job", sa.Text(), nullable=True))
    op.add_column("channels", sa.Column("moved_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("channels", "moved_at")
    op.drop_column("channels", "aggregate_job")
    op.drop_column("channels", "mode")
