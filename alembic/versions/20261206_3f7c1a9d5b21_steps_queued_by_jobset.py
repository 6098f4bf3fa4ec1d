"""steps: queued steps indexed by class, jobset, priority, id (dispatch at scale)

A claim orders the queued steps of a class by priority, the jobset's fair share and
age; the share is one value per jobset, so only the head of each jobset's queue can
come first. This index serves those heads (``leases._heads``): with 100,000 queued
steps a claim no longer sorts them all (~0.7 s a claim before; ``bench/dispatch_scale.py``).
It replaces ix_steps_runnable (class, priority, id), which also served the class
filters: kept, the planner walked it for a jobset's head, reading the whole backlog to
find an almost empty jobset's few steps.

Revision ID: 3f7c1a9d5b21
Revises: 7b3e9d2c4a18
Create Date: 2026-12-06 20:30:00.000000+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "3f7c1a9d5b21"
down_revision: str | None = "7b3e9d2c4a18"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_index("ix_steps_runnable", table_name="steps")
    op.create_index("ix_steps_queued_by_jobset", "steps",
                    ["queue_class", "jobset_id", sa.text("priority DESC"), "id"],
                    postgresql_where=sa.text("state = 'queued'"))


def downgrade() -> None:
    op.drop_index("ix_steps_queued_by_jobset", table_name="steps")
    op.create_index("ix_steps_runnable", "steps",
                    ["queue_class", sa.text("priority DESC"), "id"],
                    postgresql_where=sa.text("state = 'queued'"))
