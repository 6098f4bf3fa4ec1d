"""``circus-migrate``: apply, inspect and check database migrations."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, pool

from alembic import command
from circus.common.config import load_settings
from circus.common.configbase import exit_on_bad_config
from circus.common.db import normalise_url

ROOT = Path(__file__).resolve().parents[2]


def alembic_config(database_url: str) -> Config:
    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "alembic"))
    # ConfigParser interpolation: a literal % in a password must be doubled
    config.set_main_option("sqlalchemy.url", normalise_url(database_url).replace("%", "%%"))
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(database_url), revision)


def heads(database_url: str = "postgresql:///unused") -> list[str]:
    return list(ScriptDirectory.from_config(alembic_config(database_url)).get_heads())


def current_revisions(database_url: str) -> list[str]:
    engine = create_engine(normalise_url(database_url), poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            return list(MigrationContext.configure(conn).get_current_heads())
    finally:
        engine.dispose()


def drift(database_url: str) -> list[Any]:
    """Differences between the models and a database migrated to head."""
    from circus.common.migration_hooks import compare_type, render_item
    from circus.common.models import Base

    engine = create_engine(normalise_url(database_url), poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(
                conn, opts={"compare_type": compare_type, "render_item": render_item})
            return list(compare_metadata(context, Base.metadata))
    finally:
        engine.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="circus-migrate", description=__doc__)
    parser.add_argument("--database-url", help="overrides database.url from the config")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="apply migrations (default: to head)")
    up.add_argument("revision", nargs="?", default="head")
    sub.add_parser("status", help="show the database's revision and the head")
    sub.add_parser("check", help="fail when models and migrations drift or heads diverge")
    create = sub.add_parser("create", help="autogenerate a migration from model changes")
    create.add_argument("-m", "--message", required=True)
    args = parser.parse_args(argv)

    with exit_on_bad_config():
        url = args.database_url or load_settings().require_database_url()

    if args.command == "up":
        upgrade(url, args.revision)
        return 0
    if args.command == "status":
        current = current_revisions(url)
        head = heads(url)
        print(f"database: {', '.join(current) or '(empty)'}")
        print(f"head:     {', '.join(head)}")
        print("up to date" if sorted(current) == sorted(head) else "migrations pending")
        return 0 if sorted(current) == sorted(head) else 1
    if args.command == "check":
        head = heads(url)
        if len(head) != 1:
            print(f"expected one migration head, found {len(head)}: {', '.join(head)}",
                  file=sys.stderr)
            return 1
        if current_revisions(url) != head:
            print("database is not at head; run `circus-migrate up` first", file=sys.stderr)
            return 1
        diffs = drift(url)
        if diffs:
            print("models and migrations differ; run `circus-migrate create -m ...`:",
                  file=sys.stderr)
            for diff in diffs:
                print(f"  {diff}", file=sys.stderr)
            return 1
        print("models and migrations agree")
        return 0
    if args.command == "create":
        command.revision(alembic_config(url), message=args.message, autogenerate=True)
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
