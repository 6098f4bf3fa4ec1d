"""builds.outputs_to_install: meta.outputsToInstall, written into channels' default.nix

Revision ID: 8d2b6c4e1f93
Revises: 3c4f1a9e2b7d
Create Date: 2026-12-06 05:20:00.000000+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from alembic import op

revision: str = "8d2b6c4e1f93"
down_revision: str | None = "3c4f1a9e2b7d"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("builds", sa.Column("outputs_to_install", postgresql.ARRAY(sa.Text()),
                                      nullable=True))


def downgrade() -> None:
    op.drop_column("builds", "outputs_to_install")
