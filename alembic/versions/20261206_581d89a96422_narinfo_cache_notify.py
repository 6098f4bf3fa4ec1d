"""narinfo_cache NOTIFYs its changes: the servers' in-memory index of recorded hash parts

Every statement that inserts, updates or deletes rows of narinfo_cache sends the hash
parts it touched on channel ``circus_narinfo`` (delivered at commit, nothing for a
rolled-back transaction): ``+h1,h2,...`` for inserted rows, ``~...`` for changed ones,
``-...`` for deleted ones, at most 200 hash parts per notification (the payload limit is
8000 bytes); ``*`` after a TRUNCATE. A trigger rather than calls in Python, so no writer
(publish, presigned uploads, retention, a manual DELETE) can forget it.

Revision ID: 581d89a96422
Revises: 5d2b8e4f1a90
Create Date: 2026-12-06 05:10:00.000000+00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "581d89a96422"
down_revision: str | None = "5d2b8e4f1a90"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("""
        CREATE FUNCTION narinfo_cache_notify() RETURNS trigger LANGUAGE plpgsql AS $$
        DECLARE
            batch text;
            kind text := CASE TG_OP WHEN 'INSERT' THEN '+' WHEN 'UPDATE' THEN '~' ELSE '-' END;
        BEGIN
            FOR batch IN
                SELECT string_agg(hash_part, ',')
                FROM (SELECT hash_part, (row_number() OVER () - 1) / 200 AS chunk
                      FROM changed) AS numbered
                GROUP BY chunk
            LOOP
                PERFORM pg_notify('circus_narinfo', kind || batch);
            END LOOP;
            RETURN NULL;
        END $$
    """)
    op.execute("""
        CREATE FUNCTION narinfo_cache_notify_truncate() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('circus_narinfo', '*');
            RETURN NULL;
        END $$
    """)
    op.execute("""CREATE TRIGGER narinfo_cache_inserted AFTER INSERT ON narinfo_cache
                  REFERENCING NEW TABLE AS changed
                  FOR EACH STATEMENT EXECUTE FUNCTION narinfo_cache_notify()""")
    op.execute("""CREATE TRIGGER narinfo_cache_updated AFTER UPDATE ON narinfo_cache
                  REFERENCING NEW TABLE AS changed
                  FOR EACH STATEMENT EXECUTE FUNCTION narinfo_cache_notify()""")
    op.execute("""CREATE TRIGGER narinfo_cache_deleted AFTER DELETE ON narinfo_cache
                  REFERENCING OLD TABLE AS changed
                  FOR EACH STATEMENT EXECUTE FUNCTION narinfo_cache_notify()""")
    op.execute("""CREATE TRIGGER narinfo_cache_truncated AFTER TRUNCATE ON narinfo_cache
                  FOR EACH STATEMENT EXECUTE FUNCTION narinfo_cache_notify_truncate()""")


def downgrade() -> None:
    for name in ("inserted", "updated", "deleted", "truncated"):
        op.execute(f"DROP TRIGGER narinfo_cache_{name} ON narinfo_cache")
    op.execute("DROP FUNCTION narinfo_cache_notify_truncate()")
    op.execute("DROP FUNCTION narinfo_cache_notify()")
