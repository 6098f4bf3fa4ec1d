"""Small SQL helpers for the queue runner's batched statements."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)

T = TypeVar("T")

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
            with factory() as session, session.begin():
                return work(session)
        except DBAPIError as exc:
            if not is_retryable(exc) or attempt == attempts - 1:
                raise
            log.info("retrying after %s", getattr(exc.orig, "pgcode", exc))
            time.sleep(random.uniform(0.01, 0.05) * (attempt + 1))
    raise AssertionError("unreachable")
