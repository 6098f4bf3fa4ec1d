"""service_counters: counts server processes add to (cache hits, misses, bytes served)

Revision ID: 5d2a8c7e1f30
Revises: 8d2b6c4e1f93
Create Date: 2026-12-06 05:10:00.000000+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "5d2a8c7e1f30"
down_revision: str | None = "8d2b6c4e1f93"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "service_counters",
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("value", sa.BigInteger(), server_default="0", nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_service_counters")),
    )


def downgrade() -> None:
    op.drop_table("service_counters")
