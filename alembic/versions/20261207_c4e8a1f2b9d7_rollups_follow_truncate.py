"""builds_rollups_truncate: emptying builds with TRUNCATE empties their rollups

TRUNCATE fires no row or statement trigger of INSERT/UPDATE/DELETE, so after
``TRUNCATE builds`` (directly or cascaded from projects, jobsets or evaluations) the
rollups of migration b7d2e4f1a9c3 went on counting builds that no longer existed in
``/builds/stats``, the time series and the dashboard's counters.

Revision ID: c4e8a1f2b9d7
Revises: b7d2e4f1a9c3
Create Date: 2026-12-07 05:30:00.000000+00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "c4e8a1f2b9d7"
down_revision: str | None = "b7d2e4f1a9c3"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # DELETE, not TRUNCATE: a TRUNCATE inside the trigger would need an ACCESS EXCLUSIVE
    # lock on the rollups that a concurrent reader of /builds/stats could deadlock with
    op.execute("""
        CREATE FUNCTION build_rollups_empty() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            DELETE FROM build_status_totals;
            DELETE FROM build_completion_hours;
            DELETE FROM project_completion_hours;
            RETURN NULL;
        END $$""")
    op.execute("""
        CREATE TRIGGER builds_rollups_truncate AFTER TRUNCATE ON builds
        FOR EACH STATEMENT EXECUTE FUNCTION build_rollups_empty()""")


def downgrade() -> None:
    op.execute("DROP TRIGGER builds_rollups_truncate ON builds")
    op.execute("DROP FUNCTION build_rollups_empty()")
