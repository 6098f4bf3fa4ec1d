"""The reconciler: converge the queue to what the database says, whatever happened.

Run periodically by every ``circus-queue-runner`` (one at a time, through a
transaction-level advisory lock). It makes ``kill -9`` of a worker, a Redis
restart and lost messages harmless:

- running steps whose lease lapsed go back to the queue (``leases.expire_leases``),
  or end ``aborted`` after ``max_retries`` attempts;
- pending steps whose dependencies all succeeded are queued (a safety net);
- queued steps nobody claimed for ``republish_secs`` get their wake-up again;
- classes no live consumer can serve are noted; after ``unsupported_timeout``
  their steps end ``unsupported_system``.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy import text
from sqlalchemy.orm import Session

from circus.common.config import Settings
from circus.common.enums import BuildStatus
from circus.common.heartbeat import fresh_build_slot_holders
from circus.common.statussql import dependencies_succeeded
from circus.queue_runner.routing.capabilities import Capabilities, parse_queue_class
from circus.queue_runner.steps.leases import expire_leases
from circus.queue_runner.steps.outcomes import (
    FinishReport,
    after_steps_done,
    done_steps,
)

log = logging.getLogger(__name__)

#: pg_try_advisory_xact_lock key of the reconciler ("CQRR")
RECONCILE_LOCK = 0x43515252


@dataclass
class ReconcileReport:
    ran: bool = False
    requeued: int = 0
    repaired: int = 0
    republished: Counter[str] = field(default_factory=Counter)
    unsupported: int = 0
    finish: FinishReport = field(default_factory=FinishReport)

    @property
    def to_publish(self) -> Counter[str]:
        counts = Counter(self.republished)
        counts.update(self.finish.queued)
        return counts


@dataclass(frozen=True)
class LiveConsumer:
    """A consumer that could take a step now or soon, and how many at once."""

    capabilities: Capabilities
    #: steps it builds at once (local workers, ``max_jobs``)
    slots: int
    #: a queue runner's local builder name (``LocalBuilder.name``), to leave oneself out
    local_builder: str | None = None


def live_consumers(session: Session, now: datetime | None = None,
                   settings: Settings | None = None) -> list[Capabilities]:
    """Capabilities of every consumer that could take a step now or soon
    (:func:`live_consumer_slots`)."""
    return [c.capabilities for c in live_consumer_slots(session, now, settings)]


def live_consumer_slots(session: Session, now: datetime | None = None,
                        settings: Settings | None = None) -> list[LiveConsumer]:
    """Every consumer that could take a step now or soon, with its slots.

    Queue runners and remote Celery workers count while their heartbeat is fresh.
    An enabled SSH builder counts while its back-off ends within
    ``unsupported_timeout``: a builder that failed a few times (rebooting,
    a network blip) keeps its classes alive, one whose back-off has grown
    longer than that (down for good, wrong host key) does not, and its steps
    go ``unsupported_system`` a timeout later unless another machine turns up.
    A builder without ``public_host_key`` never counts while
    ``ssh_require_host_key`` is on: it is refused without being tried.
    Connected agents count with their ``max_jobs``.
    """
    now = now or datetime.now(UTC)
    found: list[LiveConsumer] = []
    for details in fresh_build_slot_holders(session, now):
        slots = details.get("workers")
        for caps in details.get("capabilities", []):
            found.append(LiveConsumer(Capabilities.from_json(caps),
                                      max(1, slots) if isinstance(slots, int) else 1,
                                      details.get("local_builder")))
    runner = settings.queue_runner if settings is not None else None
    for systems, supported, mandatory, max_jobs in session.execute(text("""
        SELECT systems, supported_features, mandatory_features, max_jobs FROM remote_builders
        WHERE enabled
          AND (disabled_until IS NULL
               OR disabled_until <= now() + make_interval(secs => :patience))
          AND (NOT :require_key OR coalesce(btrim(public_host_key), '') <> '')
        UNION ALL
        SELECT systems, supported_features, mandatory_features, max_jobs FROM builder_sessions
        WHERE connected
    """), {"patience": float(runner.unsupported_timeout if runner else 0),
           "require_key": bool(runner.ssh_require_host_key if runner else False)}).all():
        found.append(LiveConsumer(Capabilities(frozenset(systems), frozenset(supported),
                                               frozenset(mandatory)), max(1, max_jobs or 1)))
    return found


def reconcile(session: Session, settings: Settings,
              local: list[Capabilities] | None = None) -> ReconcileReport:
    """One round (call in a transaction; publish ``report.to_publish`` after commit).

    ``local`` names the caller's own consumers, which count as live even before
    their first heartbeat is written.
    """
    report = ReconcileReport()
    got = session.execute(text("SELECT pg_try_advisory_xact_lock(:key)"),
                          {"key": RECONCILE_LOCK}).scalar_one()
    if not got:
        return report
    report.ran = True
    expired = expire_leases(session, settings)
    report.requeued = len(expired.requeued)
    report.finish.merge(expired)
    report.repaired = _queue_stuck_pending(session, report.finish)
    report.republished = _republish(session, settings)
    report.unsupported = _fail_unsupported(session, settings, report.finish, local or [])
    if report.requeued or report.repaired or report.unsupported:
        log.info("reconciler: %d lease(s) lapsed, %d stuck step(s) queued, %d unsupported",
                 report.requeued, report.repaired, report.unsupported)
    return report


def _queue_stuck_pending(session: Session, report: FinishReport) -> int:
    rows = session.execute(text(f"""
        WITH stuck AS (
            SELECT s.id FROM steps s
            WHERE s.state = 'pending' AND {dependencies_succeeded("s")}
            ORDER BY s.id FOR UPDATE SKIP LOCKED
        )
        UPDATE steps SET state = 'queued', queued_at = now(), published_at = now()
        FROM stuck WHERE steps.id = stuck.id AND steps.state = 'pending'
        RETURNING steps.queue_class
    """)).scalars().all()
    report.queued.update(rows)
    return len(rows)


def _republish(session: Session, settings: Settings) -> Counter[str]:
    """Queued steps whose wake-up may be lost (or whose back-off just ended)."""
    rows = session.execute(text("""
        UPDATE steps SET published_at = now()
        WHERE state = 'queued'
          AND (not_before IS NULL OR not_before <= now())
          AND (published_at IS NULL
               OR published_at < now() - make_interval(secs => :after)
               OR (not_before IS NOT NULL AND published_at < not_before))
        RETURNING queue_class
    """), {"after": float(settings.queue_runner.republish_secs)}).scalars().all()
    return Counter(rows)


def _fail_unsupported(session: Session, settings: Settings, report: FinishReport,
                      local: list[Capabilities]) -> int:
    consumers = [*local, *live_consumers(session, settings=settings)]
    waiting = session.execute(text("""
        SELECT DISTINCT queue_class FROM steps WHERE state IN ('pending', 'queued')
    """)).scalars().all()
    unservable = sorted(c for c in waiting if not any(m.can_serve(c) for m in consumers))
    servable = sorted(set(waiting) - set(unservable))
    if servable:
        session.execute(text("""
            UPDATE queue_classes SET unsupported_since = NULL
            WHERE name = ANY(:names) AND unsupported_since IS NOT NULL
        """), {"names": servable})
    if not unservable:
        return 0
    parsed = [parse_queue_class(name) for name in unservable]
    session.execute(text("""
        INSERT INTO queue_classes (name, system, required_features, created_at, unsupported_since)
        SELECT v.name, v.system, string_to_array(v.features, ' '), now(), now()
        FROM unnest(CAST(:names AS text[]), CAST(:systems AS text[]), CAST(:features AS text[]))
             AS v(name, system, features)
        ON CONFLICT (name) DO UPDATE
            SET unsupported_since = COALESCE(queue_classes.unsupported_since, now())
    """), {"names": unservable, "systems": [p[0] for p in parsed],
           "features": [" ".join(p[1]) for p in parsed]})
    timeout = timedelta(seconds=settings.queue_runner.unsupported_timeout)
    expired = session.execute(text("""
        SELECT name FROM queue_classes
        WHERE name = ANY(:names) AND unsupported_since <= now() - :timeout
    """), {"names": unservable, "timeout": timeout}).scalars().all()
    if not expired:
        return 0
    failed = session.execute(text("""
        WITH doomed AS (
            SELECT id FROM steps WHERE queue_class = ANY(:names) AND state IN ('pending', 'queued')
            ORDER BY id FOR UPDATE SKIP LOCKED
        )
        UPDATE steps SET state = 'done', status = :status, finished_at = now(),
                         error_message = 'no machine supports ' || queue_class
        FROM doomed WHERE steps.id = doomed.id
        RETURNING steps.id
    """), {"names": list(expired), "status": int(BuildStatus.unsupported_system)}
    ).scalars().all()
    if failed:
        report.merge(after_steps_done(session, settings,
                                      done_steps(session, sorted(failed)), {}))
    return len(failed)
