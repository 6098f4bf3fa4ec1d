"""Alembic environment: metadata from circus.common.models, one migrator at a time."""

from __future__ import annotations

from sqlalchemy import Connection, create_engine, pool, text

from alembic import context
from circus.common.db import normalise_url
from circus.common.migration_hooks import compare_type, render_item
from circus.common.models import Base

# an arbitrary constant: every circus-migrate takes this lock, so two daemons
# starting at once never run the same migration twice
MIGRATION_LOCK_ID = 0x43495243  # "CIRC"

config = context.config
target_metadata = Base.metadata


def configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_item=render_item,
        compare_type=compare_type,
        compare_server_default=False,
        transaction_per_migration=False,
    )


def run_migrations_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
        render_item=render_item,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run_locked(connection)
        return
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        from circus.common.config import load_settings

        url = load_settings().require_database_url()
    engine = create_engine(normalise_url(url), poolclass=pool.NullPool)
    with engine.connect() as conn:
        _run_locked(conn)


def _run_locked(connection: Connection) -> None:
    # fail fast instead of queueing behind a long transaction holding a table lock
    connection.execute(text("SET lock_timeout = '10s'"))
    connection.execute(text("SET statement_timeout = '10min'"))
    connection.execute(text("SELECT pg_advisory_lock(:id)"), {"id": MIGRATION_LOCK_ID})
    try:
        configure(connection)
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()
    finally:
        connection.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": MIGRATION_LOCK_ID})
        connection.commit()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
