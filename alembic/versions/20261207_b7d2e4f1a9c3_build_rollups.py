"""build_status_totals, build_completion_hours, project_completion_hours: rollups of
the builds for
``/builds/stats``, the systems summary and the time series, kept by statement triggers

At a million builds, each of those figures was a scan of the builds table (0.9-2.0 s
at p99: every server process computed it once before its cache served it). The
rollups are delta rows: each statement changing builds appends, per key it touched,
the change of its count and durations, so two transactions finishing builds never
wait for each other on a counter row; ``circus.common.rollups.compact`` merges them.

Revision ID: b7d2e4f1a9c3
Revises: 9e4a2c7d1b36
Create Date: 2026-12-07 02:20:00.000000+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "b7d2e4f1a9c3"
down_revision: str | None = "9e4a2c7d1b36"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: each rollup's key (jobset first: one jobset's stats and series read its rows by the
#: index); project_completion_hours serves the series of all jobsets, or a project's, from
#: an eighth of the rows (bench data: 3,272 against 26,199)
KEYS = {
    "build_status_totals": ["jobset_id", "project_id", "system", "status"],
    "build_completion_hours": ["jobset_id", "project_id", "status", "hour"],
    "project_completion_hours": ["project_id", "status", "hour"],
}
#: the columns of builds a rollup depends on; an update changing none of them adds nothing
COLUMNS = ("project_id", "jobset_id", "system", "status", "started_at", "completed_at")


def _signed_rows(operation: str) -> str:
    """The builds the statement changed, as (COLUMNS..., n): +1 for a row now there,
    -1 for one no longer there (an update is both, when it changed a COLUMN)."""
    columns = ", ".join(COLUMNS)
    if operation == "INSERT":
        return f"SELECT {columns}, 1 AS n FROM new_builds"
    if operation == "DELETE":
        return f"SELECT {columns}, -1 AS n FROM old_builds"
    old = ", ".join(f"o.{c}" for c in COLUMNS)
    new = ", ".join(f"b.{c}" for c in COLUMNS)
    return f"""SELECT x.* FROM old_builds o JOIN new_builds b ON b.id = o.id
               CROSS JOIN LATERAL (VALUES ({old}, -1), ({new}, 1)) AS x({columns}, n)
               WHERE ({old}) IS DISTINCT FROM ({new})"""


def _add_deltas(operation: str) -> str:
    seconds = "extract(epoch FROM completed_at - started_at)"
    sums = f"""sum(n), coalesce(sum(n * {seconds}), 0),
               sum(CASE WHEN {seconds} IS NULL THEN 0 ELSE n END)"""
    nonzero = f"HAVING ({sums}) <> (0, 0, 0)"
    return f"""
        WITH d AS ({_signed_rows(operation)}),
        totals AS (
            INSERT INTO build_status_totals (project_id, jobset_id, system, status, builds,
                                             duration_sum, durations)
            SELECT project_id, jobset_id, system, status, {sums}
            FROM d GROUP BY project_id, jobset_id, system, status {nonzero}),
        jobset_hours AS (
            INSERT INTO build_completion_hours (project_id, jobset_id, status, hour, builds,
                                                duration_sum, durations)
            SELECT project_id, jobset_id, status, date_trunc('hour', completed_at, 'UTC'),
                   {sums}
            FROM d WHERE completed_at IS NOT NULL
            GROUP BY project_id, jobset_id, status, date_trunc('hour', completed_at, 'UTC')
            {nonzero})
        INSERT INTO project_completion_hours (project_id, status, hour, builds, duration_sum,
                                              durations)
        SELECT project_id, status, date_trunc('hour', completed_at, 'UTC'), {sums}
        FROM d WHERE completed_at IS NOT NULL
        GROUP BY project_id, status, date_trunc('hour', completed_at, 'UTC')
        {nonzero};"""


def upgrade() -> None:
    for table, key in KEYS.items():
        hour = "hour" in key
        op.create_table(
            table,
            sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
            sa.Column("project_id", sa.BigInteger(), nullable=False),
            *([sa.Column("jobset_id", sa.BigInteger(), nullable=False)]
              if "jobset_id" in key else []),
            *([sa.Column("system", sa.Text(), nullable=False)] if "system" in key else []),
            sa.Column("status", sa.SmallInteger(), nullable=False),
            *([sa.Column("hour", sa.DateTime(timezone=True), nullable=False)] if hour else []),
            sa.Column("builds", sa.BigInteger(), nullable=False),
            sa.Column("duration_sum", sa.Numeric(), nullable=False),
            sa.Column("durations", sa.BigInteger(), nullable=False),
            sa.Column("merged", sa.Boolean(), server_default="false", nullable=False),
            sa.PrimaryKeyConstraint("id", name=op.f(f"pk_{table}")),
        )
        op.create_index(f"ix_{table}_key", table, key)
        op.create_index(f"ix_{table}_unmerged", table, key,
                        postgresql_where=sa.text("NOT merged"))
    op.create_index("ix_build_completion_hours_hour", "build_completion_hours", ["hour"])
    op.create_index("ix_project_completion_hours_hour", "project_completion_hours", ["hour"])
    op.execute(f"""
        CREATE FUNCTION build_rollups_add_deltas() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_OP = 'INSERT' THEN {_add_deltas("INSERT")}
            ELSIF TG_OP = 'DELETE' THEN {_add_deltas("DELETE")}
            ELSE {_add_deltas("UPDATE")}
            END IF;
            RETURN NULL;
        END $$""")
    # statement triggers (an import's COPY of thousands of builds adds a few rows); no
    # column list on the update one: PostgreSQL allows none beside transition tables
    op.execute("""
        CREATE TRIGGER builds_rollups_insert AFTER INSERT ON builds
        REFERENCING NEW TABLE AS new_builds
        FOR EACH STATEMENT EXECUTE FUNCTION build_rollups_add_deltas()""")
    op.execute("""
        CREATE TRIGGER builds_rollups_update AFTER UPDATE ON builds
        REFERENCING OLD TABLE AS old_builds NEW TABLE AS new_builds
        FOR EACH STATEMENT EXECUTE FUNCTION build_rollups_add_deltas()""")
    op.execute("""
        CREATE TRIGGER builds_rollups_delete AFTER DELETE ON builds
        REFERENCING OLD TABLE AS old_builds
        FOR EACH STATEMENT EXECUTE FUNCTION build_rollups_add_deltas()""")
    # backfill, merged (the triggers' lock on builds keeps writers out until commit)
    op.execute("""
        INSERT INTO build_status_totals (project_id, jobset_id, system, status, builds,
                                         duration_sum, durations, merged)
        SELECT project_id, jobset_id, system, status, count(*),
               coalesce(sum(extract(epoch FROM completed_at - started_at)), 0),
               count(completed_at - started_at), true
        FROM builds GROUP BY project_id, jobset_id, system, status""")
    op.execute("""
        INSERT INTO build_completion_hours (project_id, jobset_id, status, hour, builds,
                                            duration_sum, durations, merged)
        SELECT project_id, jobset_id, status, date_trunc('hour', completed_at, 'UTC'),
               count(*), coalesce(sum(extract(epoch FROM completed_at - started_at)), 0),
               count(completed_at - started_at), true
        FROM builds WHERE completed_at IS NOT NULL
        GROUP BY project_id, jobset_id, status, date_trunc('hour', completed_at, 'UTC')""")
    op.execute("""
        INSERT INTO project_completion_hours (project_id, status, hour, builds, duration_sum,
                                              durations, merged)
        SELECT project_id, status, hour, sum(builds), sum(duration_sum), sum(durations), true
        FROM build_completion_hours GROUP BY project_id, status, hour""")


def downgrade() -> None:
    for operation in ("insert", "update", "delete"):
        op.execute(f"DROP TRIGGER builds_rollups_{operation} ON builds")
    op.execute("DROP FUNCTION build_rollups_add_deltas()")
    op.drop_table("project_completion_hours")
    op.drop_table("build_completion_hours")
    op.drop_table("build_status_totals")
