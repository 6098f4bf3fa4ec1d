"""Engine and session factories; explicit, nothing created at import time."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from circus.common.config import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")


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


#: deadlock_detected, serialization_failure, lock_not_available
RETRYABLE_PGCODES = {"40P01", "40001", "55P03"}


def is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, DBAPIError):
        code = getattr(exc.orig, "pgcode", None)
        return code in RETRYABLE_PGCODES
    return False


def in_transaction(factory: sessionmaker[Session], work: Callable[[Session], T],
                   attempts: int = 5) -> T:
    """Run ``work`` in its own transaction, retrying deadlocks with jitter.

    Finishing steps locks their dependents in id order, but two transactions
    finishing overlapping parts of a DAG can still meet in another order; the
    loser is rolled back by PostgreSQL and simply runs again.
    """
    for attempt in range(attempts):
        try:
            with transaction(factory) as session:
                return work(session)
        except DBAPIError as exc:
            if not is_retryable(exc) or attempt == attempts - 1:
                raise
            log.info("retrying after %s", getattr(exc.orig, "pgcode", exc))
            time.sleep(random.uniform(0.01, 0.05) * (attempt + 1))
    raise AssertionError("unreachable")


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
