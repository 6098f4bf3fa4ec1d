"""narinfo_cache.worker_only: remote workers' inputs, not served to anyone else

A claim by a remote worker (circus-worker) publishes the step's input closure (.drv
files, their sources, the inputs' outputs) into the binary cache, where the worker
substitutes it with its token. Those paths were never served before; marked
``worker_only`` they stay out of every anonymous or API-key answer until a build's
outputs closure publishes them the usual way (which clears the mark).

Revision ID: 9e4a2c7d1b36
Revises: a3d7f1c9e5b8
Create Date: 2026-12-06 23:55:00.000000+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "9e4a2c7d1b36"
down_revision: str | None = "a3d7f1c9e5b8"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("narinfo_cache", sa.Column("worker_only", sa.Boolean(),
                                             server_default="false", nullable=False))


def downgrade() -> None:
    op.drop_column("narinfo_cache", "worker_only")
