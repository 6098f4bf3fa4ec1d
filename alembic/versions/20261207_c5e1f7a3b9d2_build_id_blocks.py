"""build_id_blocks: builds per project and block of 10,000 ids, kept by statement
triggers, for deep offsets of the builds list

``GET /api/v1/builds?offset=500000`` walked 500,000 ids of the primary key to the
page's first one (107-180 ms, bench data); summing ~100 blocks and walking inside one
finds it in a few milliseconds. Delta rows like the rollups of ``b7d2e4f1a9c3``: an
insert or delete of builds appends, per project and block it touched, the change of
the count; ``circus.common.rollups.compact`` merges them.

Revision ID: c5e1f7a3b9d2
Revises: c4e8a1f2b9d7
Create Date: 2026-12-07 05:30:00.000000+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "c5e1f7a3b9d2"
down_revision: str | None = "c4e8a1f2b9d7"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: ids per block (circus.common.models.builds.BUILD_ID_BLOCK)
BLOCK = 10_000


def _add_deltas(rows: str, sign: str) -> str:
    return f"""
        INSERT INTO build_id_blocks (project_id, block, builds)
        SELECT project_id, id / {BLOCK}, {sign}count(*) FROM {rows}
        GROUP BY project_id, id / {BLOCK};"""


def upgrade() -> None:
    op.create_table(
        "build_id_blocks",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("project_id", sa.BigInteger(), nullable=False),
        sa.Column("block", sa.BigInteger(), nullable=False),
        sa.Column("builds", sa.BigInteger(), nullable=False),
        sa.Column("merged", sa.Boolean(), server_default="false", nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_build_id_blocks")),
    )
    op.create_index("ix_build_id_blocks_key", "build_id_blocks", ["project_id", "block"])
    op.create_index("ix_build_id_blocks_unmerged", "build_id_blocks", ["project_id", "block"],
                    postgresql_where=sa.text("NOT merged"))
    # an update never moves a build to another id or project: insert and delete only
    op.execute(f"""
        CREATE FUNCTION build_id_blocks_add_deltas() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_OP = 'INSERT' THEN {_add_deltas("new_builds", "")}
            ELSE {_add_deltas("old_builds", "-")}
            END IF;
            RETURN NULL;
        END $$""")
    op.execute("""
        CREATE TRIGGER builds_id_blocks_insert AFTER INSERT ON builds
        REFERENCING NEW TABLE AS new_builds
        FOR EACH STATEMENT EXECUTE FUNCTION build_id_blocks_add_deltas()""")
    op.execute("""
        CREATE TRIGGER builds_id_blocks_delete AFTER DELETE ON builds
        REFERENCING OLD TABLE AS old_builds
        FOR EACH STATEMENT EXECUTE FUNCTION build_id_blocks_add_deltas()""")
    # TRUNCATE fires no delete trigger (as in c4e8a1f2b9d7; DELETE for the same reason)
    op.execute("""
        CREATE FUNCTION build_id_blocks_empty() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            DELETE FROM build_id_blocks;
            RETURN NULL;
        END $$""")
    op.execute("""
        CREATE TRIGGER builds_id_blocks_truncate AFTER TRUNCATE ON builds
        FOR EACH STATEMENT EXECUTE FUNCTION build_id_blocks_empty()""")
    op.execute(f"""
        INSERT INTO build_id_blocks (project_id, block, builds, merged)
        SELECT project_id, id / {BLOCK}, count(*), true FROM builds
        GROUP BY project_id, id / {BLOCK}""")


def downgrade() -> None:
    for operation in ("insert", "delete", "truncate"):
        op.execute(f"DROP TRIGGER builds_id_blocks_{operation} ON builds")
    op.execute("DROP FUNCTION build_id_blocks_add_deltas()")
    op.execute("DROP FUNCTION build_id_blocks_empty()")
    op.drop_table("build_id_blocks")
