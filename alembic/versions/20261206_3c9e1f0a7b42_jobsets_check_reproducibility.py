"""jobsets.check_reproducibility, builds.repeats: reproducibility checks (nix-store --check)

Revision ID: 3c9e1f0a7b42
Revises: 7617d5b7a2c1
Create Date: 2026-12-06 03:40:00.000000+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "3c9e1f0a7b42"
down_revision: str | None = "7617d5b7a2c1"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("jobsets", sa.Column("check_reproducibility", sa.Boolean(),
                                       server_default="false", nullable=False))
    op.add_column("builds", sa.Column("repeats", sa.BigInteger(), server_default="0",
                                      nullable=False))


def downgrade() -> None:
    op.drop_column("builds", "repeats")
    op.drop_column("jobsets", "check_reproducibility")
