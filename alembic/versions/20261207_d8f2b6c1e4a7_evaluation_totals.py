"""evaluation_totals: evaluations per jobset, status and trigger kind, kept by statement
triggers, for the exact total of every list of evaluations

``GET /api/v1/evaluations`` counted up to 10,001 evaluations a page (after the plan's
estimate): ~3 ms of the database and ~3 ms of Python on the bench data's 10,000. The
filters of the list (jobset, project through the jobset, status, trigger kind) are the
key of this rollup, delta rows like those of ``b7d2e4f1a9c3``: each statement inserting,
deleting or changing the key of evaluations appends, per key it touched, the change of
the count; ``circus.common.rollups.compact`` merges them.

Revision ID: d8f2b6c1e4a7
Revises: c5e1f7a3b9d2
Create Date: 2026-12-07 05:45:00.000000+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "d8f2b6c1e4a7"
down_revision: str | None = "c5e1f7a3b9d2"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

KEY = "jobset_id, status, trigger_kind"


def _add_deltas(signed_rows: str) -> str:
    return f"""
        INSERT INTO evaluation_totals ({KEY}, evaluations)
        SELECT {KEY}, sum(n) FROM ({signed_rows}) AS d
        GROUP BY {KEY} HAVING sum(n) <> 0;"""


_CHANGED = """
    SELECT x.* FROM old_evaluations o JOIN new_evaluations e ON e.id = o.id
    CROSS JOIN LATERAL (VALUES (o.jobset_id, o.status, o.trigger_kind, -1),
                               (e.jobset_id, e.status, e.trigger_kind, 1))
        AS x(jobset_id, status, trigger_kind, n)
    WHERE (o.jobset_id, o.status, o.trigger_kind)
          IS DISTINCT FROM (e.jobset_id, e.status, e.trigger_kind)"""


def upgrade() -> None:
    op.create_table(
        "evaluation_totals",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("jobset_id", sa.BigInteger(), nullable=False),
        # the evaluations' values, checked there
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("trigger_kind", sa.String(32), nullable=False),
        sa.Column("evaluations", sa.BigInteger(), nullable=False),
        sa.Column("merged", sa.Boolean(), server_default="false", nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_evaluation_totals")),
    )
    op.create_index("ix_evaluation_totals_key", "evaluation_totals",
                    ["jobset_id", "status", "trigger_kind"])
    op.create_index("ix_evaluation_totals_unmerged", "evaluation_totals",
                    ["jobset_id", "status", "trigger_kind"],
                    postgresql_where=sa.text("NOT merged"))
    op.execute(f"""
        CREATE FUNCTION evaluation_totals_add_deltas() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_OP = 'INSERT' THEN
                {_add_deltas(f"SELECT {KEY}, 1 AS n FROM new_evaluations")}
            ELSIF TG_OP = 'DELETE' THEN
                {_add_deltas(f"SELECT {KEY}, -1 AS n FROM old_evaluations")}
            ELSE {_add_deltas(_CHANGED)}
            END IF;
            RETURN NULL;
        END $$""")
    op.execute("""
        CREATE TRIGGER evaluations_totals_insert AFTER INSERT ON evaluations
        REFERENCING NEW TABLE AS new_evaluations
        FOR EACH STATEMENT EXECUTE FUNCTION evaluation_totals_add_deltas()""")
    op.execute("""
        CREATE TRIGGER evaluations_totals_update AFTER UPDATE ON evaluations
        REFERENCING OLD TABLE AS old_evaluations NEW TABLE AS new_evaluations
        FOR EACH STATEMENT EXECUTE FUNCTION evaluation_totals_add_deltas()""")
    op.execute("""
        CREATE TRIGGER evaluations_totals_delete AFTER DELETE ON evaluations
        REFERENCING OLD TABLE AS old_evaluations
        FOR EACH STATEMENT EXECUTE FUNCTION evaluation_totals_add_deltas()""")
    # TRUNCATE fires no delete trigger (DELETE inside, as in c4e8a1f2b9d7)
    op.execute("""
        CREATE FUNCTION evaluation_totals_empty() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            DELETE FROM evaluation_totals;
            RETURN NULL;
        END $$""")
    op.execute("""
        CREATE TRIGGER evaluations_totals_truncate AFTER TRUNCATE ON evaluations
        FOR EACH STATEMENT EXECUTE FUNCTION evaluation_totals_empty()""")
    op.execute(f"""
        INSERT INTO evaluation_totals ({KEY}, evaluations, merged)
        SELECT {KEY}, count(*), true FROM evaluations GROUP BY {KEY}""")


def downgrade() -> None:
    for operation in ("insert", "update", "delete", "truncate"):
        op.execute(f"DROP TRIGGER evaluations_totals_{operation} ON evaluations")
    op.execute("DROP FUNCTION evaluation_totals_add_deltas()")
    op.execute("DROP FUNCTION evaluation_totals_empty()")
    op.drop_table("evaluation_totals")
