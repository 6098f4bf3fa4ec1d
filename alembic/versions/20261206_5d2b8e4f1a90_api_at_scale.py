"""The API at a million builds: stored status counts of finished evaluations, trigram
search of job names, prefix search of store paths under any collation, a jobset's
builds by id

Revision ID: 5d2b8e4f1a90
Revises: 5d2a8c7e1f30
Create Date: 2026-12-06 05:05:00.000000+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY, JSONB

from alembic import op

revision: str = "5d2b8e4f1a90"
down_revision: str | None = "5d2a8c7e1f30"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("evaluations", sa.Column("status_counts", JSONB(), nullable=True))
    op.add_column("evaluations", sa.Column("unfinished_build_ids", ARRAY(sa.BigInteger()),
                                           nullable=True))
    # A finished build changing status (a restart, status codes 0 and 1 being pending and
    # running) makes the stored counts of every evaluation holding it wrong: forget them.
    # The update locks those evaluations' rows until the restart commits, which is what
    # keeps a concurrent store of the counts (evaluator/counts.py) from storing stale ones.
    op.execute("""
        CREATE FUNCTION evaluations_forget_status_counts() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            UPDATE evaluations SET status_counts = NULL, unfinished_build_ids = NULL
            WHERE id IN (SELECT evaluation_id FROM evaluation_builds WHERE build_id = NEW.id);
            RETURN NULL;
        END $$""")
    op.execute("""
        CREATE TRIGGER builds_forget_status_counts AFTER UPDATE OF status ON builds
        FOR EACH ROW WHEN (OLD.status NOT IN (0, 1) AND NEW.status IS DISTINCT FROM OLD.status)
        EXECUTE FUNCTION evaluations_forget_status_counts()""")
    op.create_index("ix_builds_jobset_id_id", "builds", ["jobset_id", sa.text("id DESC")])
    # pg_trgm is a trusted extension (PostgreSQL >= 13): the database owner may create it
    op.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
    op.create_index("ix_builds_job_name_trgm", "builds", ["job_name"], postgresql_using="gin",
                    postgresql_ops={"job_name": "gin_trgm_ops"})
    # text_pattern_ops serves LIKE 'prefix%' under C.UTF-8 and other collations, and
    # equality as before
    op.drop_index("ix_builds_drv_path", table_name="builds")
    op.create_index("ix_builds_drv_path", "builds", ["drv_path"],
                    postgresql_ops={"drv_path": "text_pattern_ops"})
    op.drop_index("ix_build_outputs_path", table_name="build_outputs")
    op.create_index("ix_build_outputs_path", "build_outputs", ["path"],
                    postgresql_ops={"path": "text_pattern_ops"})


def downgrade() -> None:
    op.drop_index("ix_build_outputs_path", table_name="build_outputs")
    op.create_index("ix_build_outputs_path", "build_outputs", ["path"])
    op.drop_index("ix_builds_drv_path", table_name="builds")
    op.create_index("ix_builds_drv_path", "builds", ["drv_path"])
    op.drop_index("ix_builds_job_name_trgm", table_name="builds")
    op.drop_index("ix_builds_jobset_id_id", table_name="builds")
    op.execute("DROP TRIGGER builds_forget_status_counts ON builds")
    op.execute("DROP FUNCTION evaluations_forget_status_counts()")
    op.drop_column("evaluations", "unfinished_build_ids")
    op.drop_column("evaluations", "status_counts")
