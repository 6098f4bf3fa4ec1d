"""Daemon heartbeats in ``service_heartbeats`` (shown on /health and the dashboard)."""

from __future__ import annotations

import logging
import os
import socket
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session, sessionmaker

from circus import __version__
from circus.common.models import ServiceHeartbeat

log = logging.getLogger(__name__)

#: a daemon whose heartbeat is older than this is reported stale
STALE_AFTER = timedelta(seconds=60)
#: the heartbeat kind of queue runners and remote Celery workers; their details name
#: the build slots of their own (``workers``, ``capabilities``)
QUEUE_RUNNER_KIND = "queue-runner"


def beat(session: Session, kind: str, details: dict[str, Any] | None = None,
         started_at: datetime | None = None, service: str | None = None,
         host: tuple[str, int | None] | None = None) -> None:
    """Record that a daemon is alive; ``host`` is the (hostname, pid) of a daemon on
    another host beating through the server (default: this process)."""
    hostname, pid = host or (socket.gethostname(), os.getpid())
    now = datetime.now(UTC)
    values = {
        "service": service or f"{kind}@{hostname}",
        "kind": kind,
        "hostname": hostname,
        "pid": pid,
        "version": __version__,
        "started_at": started_at or now,
        "last_heartbeat": now,
        "details": details or {},
    }
    update = {k: v for k, v in values.items() if k != "service"}
    if started_at is None:
        update.pop("started_at")
    statement = insert(ServiceHeartbeat).values(values).on_conflict_do_update(
        index_elements=["service"], set_=update)
    session.execute(statement)


def fresh_build_slot_holders(session: Session, now: datetime | None = None
                             ) -> list[dict[str, Any]]:
    """The heartbeat details of the queue runners and remote Celery workers alive now
    (``workers``: their build slots, ``capabilities``: what those slots build)."""
    fresh = (now or datetime.now(UTC)) - STALE_AFTER
    return [details or {} for details in session.scalars(
        select(ServiceHeartbeat.details).where(ServiceHeartbeat.kind == QUEUE_RUNNER_KIND,
                                               ServiceHeartbeat.last_heartbeat > fresh))]


def freshness(session: Session, now: datetime | None = None) -> list[dict[str, Any]]:
    now = now or datetime.now(UTC)
    rows = session.scalars(select(ServiceHeartbeat).order_by(ServiceHeartbeat.service))
    return [
        {
            "service": row.service,
            "kind": row.kind,
            "hostname": row.hostname,
            "last_heartbeat": row.last_heartbeat.isoformat(),
            "age_seconds": round((now - row.last_heartbeat).total_seconds(), 1),
            "fresh": now - row.last_heartbeat < STALE_AFTER,
            "version": row.version,
        }
        for row in rows
    ]


class HeartbeatThread(threading.Thread):
    """Writes a heartbeat every ``interval`` seconds until stopped."""

    def __init__(self, factory: sessionmaker[Session], kind: str, interval: float = 10.0,
                 details: Any = None, service: str | None = None) -> None:
        super().__init__(name=f"heartbeat-{kind}", daemon=True)
        self.factory = factory
        self.kind = kind
        #: row key; defaults to ``<kind>@<hostname>`` (set it when one host runs several)
        self.service = service
        self.interval = interval
        self.details = details
        self.stopped = threading.Event()
        self.started_at = datetime.now(UTC)

    def run(self) -> None:
        first = True
        while not self.stopped.is_set():
            try:
                with self.factory() as session, session.begin():
                    details = self.details() if callable(self.details) else self.details
                    beat(session, self.kind, details,
                         started_at=self.started_at if first else None, service=self.service)
                first = False
            except Exception:  # a missed heartbeat must not kill the daemon
                log.warning("could not write the %s heartbeat", self.kind, exc_info=True)
            self.stopped.wait(self.interval)

    def stop(self) -> None:
        self.stopped.set()
