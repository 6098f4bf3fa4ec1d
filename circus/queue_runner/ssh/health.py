"""SSH builder health: consecutive failures put a builder into exponential back-off.

Failures are infrastructure problems — the builder cannot be reached, refuses
its host key or authentication, a transfer or ``nix-store`` itself broke —
never a derivation failing to build. The first failure rests the builder for
``ssh_backoff_secs``, each further one doubles it (at most
``ssh_backoff_max_secs``); failures while it already rests (several slots
losing one connection) count once. A success ends the back-off.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import text
from sqlalchemy.orm import Session

from circus.common.config import Settings

#: ``last_failure`` is a short text for the machines page and the API
MAX_MESSAGE = 2000


@dataclass(frozen=True)
class Health:
    consecutive_failures: int
    disabled_until: datetime | None
    #: seconds of back-off from now (by the database's clock)
    rest_secs: float


def record_failure(session: Session, settings: Settings, builder_id: int, message: str
                   ) -> Health | None:
    runner = settings.queue_runner
    row = session.execute(text("""
        UPDATE remote_builders SET
            consecutive_failures = CASE WHEN disabled_until > now() THEN consecutive_failures
                                        ELSE consecutive_failures + 1 END,
            disabled_until = CASE WHEN disabled_until > now() THEN disabled_until
                ELSE now() + make_interval(secs => LEAST(
                    CAST(:max AS float8),
                    :base * power(2, LEAST(consecutive_failures, 40)))) END,
            last_failure = :message
        WHERE id = :id
        RETURNING consecutive_failures, disabled_until,
                  GREATEST(0, EXTRACT(EPOCH FROM disabled_until - now()))::float8 AS rest_secs
    """), {"id": builder_id, "message": message[:MAX_MESSAGE],
           "base": float(runner.ssh_backoff_secs), "max": runner.ssh_backoff_max_secs}).first()
    if row is None:
        return None
    return Health(row.consecutive_failures, row.disabled_until, float(row.rest_secs or 0.0))


def record_success(session: Session, builder_id: int) -> None:
    """End a back-off (``last_failure`` stays: it is history, shown with its builder)."""
    session.execute(text("""
        UPDATE remote_builders SET consecutive_failures = 0, disabled_until = NULL
        WHERE id = :id AND (consecutive_failures <> 0 OR disabled_until IS NOT NULL)
    """), {"id": builder_id})
