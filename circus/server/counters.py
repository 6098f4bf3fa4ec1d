"""Counts the server makes (cache hits and misses, bytes served), summed over processes.

gunicorn runs several worker processes, and Prometheus scrapes one of them at a
time: an in-process counter would report one worker's share, a different one at
each scrape. So each process adds its increments to an in-memory tally (a dict
update under a lock: the narinfo fast path serves thousands of answers a second
and must not wait for the database) and a background thread adds the tally to
``service_counters`` every :data:`FLUSH_INTERVAL_SECS`. ``/metrics`` reads the
table, after adding its own process's pending increments, so any worker reports
the total of all of them, at most one interval behind.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from collections import Counter

from flask import Flask, current_app
from sqlalchemy import Engine, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from circus.common.models import ServiceCounter

log = logging.getLogger(__name__)

FLUSH_INTERVAL_SECS = 10.0


class Tally:
    def __init__(self, engine: Engine, interval: float = FLUSH_INTERVAL_SECS) -> None:
        self.engine = engine
        self.interval = interval
        self._pending: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._flusher: threading.Thread | None = None

    def add(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self._pending[name] += amount
            if self._flusher is None:
                # started by the first count, so in the process that counts: a thread
                # started before gunicorn forks its workers would not run in them
                self._flusher = threading.Thread(target=self._run, name="counters-flush",
                                                 daemon=True)
                self._flusher.start()
                atexit.register(self.flush)

    def _run(self) -> None:
        while True:
            time.sleep(self.interval)
            self.flush()

    def flush(self) -> None:
        """Add the pending increments to ``service_counters`` (kept for the next try
        when the database is unreachable)."""
        with self._lock:
            pending, self._pending = self._pending, Counter()
        if not pending:
            return
        try:
            with Session(self.engine) as session, session.begin():
                # one statement per name in sorted order: two processes flushing the
                # same names lock the rows in the same order and cannot deadlock
                for name in sorted(pending):
                    statement = insert(ServiceCounter).values(name=name, value=pending[name])
                    session.execute(statement.on_conflict_do_update(
                        index_elements=["name"],
                        set_={"value": ServiceCounter.value + statement.excluded.value}))
        except Exception as exc:
            log.warning("could not record counters (kept for the next try): %s", exc)
            with self._lock:
                self._pending.update(pending)


def read_counters(session: Session, prefix: str) -> dict[str, int]:
    """Every counter whose name starts with ``prefix``, by name."""
    rows = session.execute(select(ServiceCounter.name, ServiceCounter.value)
                           .where(ServiceCounter.name.startswith(prefix, autoescape=True)))
    return dict(rows.tuples().all())


#: ``service_counters`` names of the binary cache (``/metrics``: circus_cache_*)
CACHE_REQUESTS = "cache_requests:"
CACHE_BYTES = "cache_bytes:"
CACHE_ERRORS = "cache_errors:"


def count_cache_request(counts: Tally, kind: str, *, hit: bool, sent: int = 0) -> None:
    """A narinfo or NAR request answered (``hit``) or not found; ``sent``: body bytes
    this server sent (0 for HEAD, and for a NAR that S3 serves)."""
    counts.add(f"{CACHE_REQUESTS}{kind}:{'hit' if hit else 'miss'}")
    if sent:
        counts.add(f"{CACHE_BYTES}{kind}", sent)


def count_cache_error(counts: Tally, reason: str) -> None:
    counts.add(f"{CACHE_ERRORS}{reason}")


def init_app(app: Flask, engine: Engine) -> Tally:
    tally = Tally(engine)
    app.extensions["circus_counters"] = tally
    return tally


def tally(app: Flask | None = None) -> Tally:
    found: Tally = (app or current_app).extensions["circus_counters"]
    return found
