"""job_names: every job name built, for substring search (a trigram index over 1M
builds cost ~170 ms a search: the trigrams every name shares have posting lists of
every build); builds by job name for the hits

Revision ID: 9c4e2a7d1b36
Revises: 3f7c1a9d5b21
Create Date: 2026-12-06 23:30:00.000000+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "9c4e2a7d1b36"
down_revision: str | None = "3f7c1a9d5b21"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "job_names",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_job_names")),
    )
    op.execute("INSERT INTO job_names (name) SELECT DISTINCT job_name FROM builds")
    op.create_index("ix_job_names_name", "job_names", ["name"])
    op.create_index("ix_job_names_name_trgm", "job_names", ["name"], postgresql_using="gin",
                    postgresql_ops={"name": "gin_trgm_ops"})
    # Names new to the table, written by the statement inserting the builds (the importer's
    # COPY; a statement trigger sees all of its rows at once). Not unique on purpose: a
    # unique name would make an import wait for (or deadlock with) another jobset's open
    # import transaction that adds the same new name; two racing imports may store a name
    # twice, and search reads distinct names.
    op.execute("""
        CREATE FUNCTION job_names_add_new() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO job_names (name)
            SELECT DISTINCT n.job_name FROM new_builds n
            WHERE NOT EXISTS (SELECT 1 FROM job_names j WHERE j.name = n.job_name);
            RETURN NULL;
        END $$""")
    op.execute("""
        CREATE TRIGGER builds_add_job_names AFTER INSERT ON builds
        REFERENCING NEW TABLE AS new_builds
        FOR EACH STATEMENT EXECUTE FUNCTION job_names_add_new()""")
    # the builds of the names found, by jobset, newest first (the trigram index on builds
    # served the search alone and is replaced)
    op.drop_index("ix_builds_job_name_trgm", table_name="builds")
    op.create_index("ix_builds_job_name_jobset_id", "builds",
                    ["job_name", "jobset_id", sa.text("id DESC")])


def downgrade() -> None:
    op.drop_index("ix_builds_job_name_jobset_id", table_name="builds")
    op.create_index("ix_builds_job_name_trgm", "builds", ["job_name"], postgresql_using="gin",
                    postgresql_ops={"job_name": "gin_trgm_ops"})
    op.execute("DROP TRIGGER builds_add_job_names ON builds")
    op.execute("DROP FUNCTION job_names_add_new()")
    op.drop_table("job_names")
