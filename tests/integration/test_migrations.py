from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import create_engine, inspect, text

from circus.cli import migrate
from circus.common.db import normalise_url
from circus.common.models import Base


def test_there_is_one_migration_head() -> None:
    assert len(migrate.heads()) == 1


def test_migrations_from_scratch_match_the_models(create_database: Callable[[str], str]) -> None:
    url = create_database("circus_migrate")
    assert migrate.current_revisions(url) == []
    migrate.upgrade(url)
    assert migrate.current_revisions(url) == migrate.heads()
    assert migrate.drift(url) == []
    tables = set(inspect(create_engine(normalise_url(url))).get_table_names())
    assert {t.name for t in Base.metadata.sorted_tables} <= tables


def test_check_command_passes_on_a_migrated_database(database_url: str) -> None:
    assert migrate.main(["--database-url", database_url, "check"]) == 0
    assert migrate.main(["--database-url", database_url, "status"]) == 0


def test_check_fails_when_models_and_schema_drift(create_database: Callable[[str], str],
                                                  capsys: object) -> None:
    url = create_database("circus_drift")
    migrate.upgrade(url)
    engine = create_engine(normalise_url(url))
    with engine.begin() as conn:
        # what a model change without a migration looks like from the database's side
        conn.execute(text("ALTER TABLE builds DROP COLUMN closure_size"))
        conn.execute(text("ALTER TABLE projects ADD COLUMN stray integer"))
    engine.dispose()
    diffs = migrate.drift(url)
    kinds = {(d[0], d[2]) if d[0] in ("add_column", "remove_column") else (d[0],) for d in diffs}
    assert ("add_column", "builds") in kinds
    assert ("remove_column", "projects") in kinds
    assert migrate.main(["--database-url", url, "check"]) == 1


def test_status_reports_pending_migrations(create_database: Callable[[str], str]) -> None:
    url = create_database("circus_status")
    assert migrate.main(["--database-url", url, "status"]) == 1
    migrate.upgrade(url)
    assert migrate.main(["--database-url", url, "status"]) == 0
