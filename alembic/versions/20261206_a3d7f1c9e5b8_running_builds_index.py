"""builds: the running ones, newest start first (the home page's list)

The home page lists the ten builds started last: through the status index that read
every running build's row and sorted them (~50 ms with 2,400 running). A partial
index holds only running builds, so it stays small and serves the ten directly.

Revision ID: a3d7f1c9e5b8
Revises: 9c4e2a7d1b36
Create Date: 2026-12-06 23:40:00.000000+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "a3d7f1c9e5b8"
down_revision: str | None = "9c4e2a7d1b36"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_builds_running", "builds",
                    [sa.text("started_at DESC NULLS LAST"), sa.text("id DESC")],
                    postgresql_where=sa.text("status = 1"))


def downgrade() -> None:
    op.drop_index("ix_builds_running", table_name="builds")
