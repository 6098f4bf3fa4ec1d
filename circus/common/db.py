"""Engine and session factories; explicit, nothing created at import time."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from circus.common.config import Settings

log = logging.getLogger(__name__)


def normalise_url(url: str) -> str:
    """Pin the psycopg2 driver (SQLAlchemy 2.1 defaults to psycopg 3)."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg2://" + url[len(prefix):]
    return url


def make_engine(settings: Settings, *, pool_size: int | None = None,
                application_name: str = "circus") -> Engine:
    db = settings.database
    connect_args: dict[str, Any] = {
        "connect_timeout": db.connect_timeout,
        "application_name": application_name,
    }
    if db.statement_timeout_ms:
        connect_args["options"] = f"-c statement_timeout={db.statement_timeout_ms}"
    return create_engine(
        normalise_url(settings.require_database_url()),
        pool_size=pool_size or db.pool_size,
        max_overflow=db.max_overflow,
        pool_timeout=db.pool_timeout,
        pool_pre_ping=True,
        connect_args=connect_args,
    )


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    with factory() as session, session.begin():
        yield session


# ---------------------------------------------------------------------------
# after-commit callbacks: Celery messages are published only once the rows they
# name are visible to other processes, and never for a rolled-back transaction.

_AFTER_COMMIT_KEY = "circus_after_commit"


def after_commit(session: Session, callback: Callable[[], None]) -> None:
    """Run ``callback`` once the session's current transaction commits."""
    if not session.in_transaction():
        # tie the callback to a transaction, so a rollback discards it
        session.begin()
    callbacks: list[Callable[[], None]] = session.info.setdefault(_AFTER_COMMIT_KEY, [])
    callbacks.append(callback)


@event.listens_for(Session, "after_commit")
def _run_after_commit(session: Session) -> None:
    callbacks = session.info.pop(_AFTER_COMMIT_KEY, [])
    for callback in callbacks:
        try:
            callback()
        except Exception:
            # the rows are committed; a lost message is re-published by the reconciler
            log.exception("after-commit callback %r failed", callback)


@event.listens_for(Session, "after_soft_rollback")
def _drop_after_commit(session: Session, previous_transaction: object) -> None:
    # any rollback discards what was promised for commit (including savepoint rollbacks)
    session.info.pop(_AFTER_COMMIT_KEY, None)
