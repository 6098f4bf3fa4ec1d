"""Counts the server makes (cache hits and misses, bytes served), summed over processes.

gunicorn runs several worker processes, and Prometheus scrapes one of them at a
time: an in-process counter would report one worker's share, a different one at
each scrape. So each process appends its increments to an in-memory queue (the
narinfo fast path serves thousands of answers a second from 32 threads per worker
and waits neither for the database nor for a lock; ``bench/cache_serve.py`` showed
no difference beyond its noise on a shared 2-core machine) and a background thread
adds them up into ``service_counters`` every :data:`FLUSH_INTERVAL_SECS`. ``/metrics`` reads the
table, after adding its own process's pending increments, so any worker reports
the total of all of them, at most one interval behind.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from collections import Counter, deque

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
        #: (name, amount) increments not yet in the database; deque.append and popleft
        #: are atomic, so counting takes no lock (at most ~10 s of requests pile up)
        self._pending: deque[tuple[str, int]] = deque()
        self._start_lock = threading.Lock()
        self._flusher: threading.Thread | None = None

    def add(self, name: str, amount: int = 1) -> None:
        self._pending.append((name, amount))
        if self._flusher is None:
            self._start_flusher()

    def _start_flusher(self) -> None:
        with self._start_lock:
            if self._flusher is not None:
                return
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
        pending: Counter[str] = Counter()
        while True:
            try:
                name, amount = self._pending.popleft()
            except IndexError:
                break
            pending[name] += amount
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
            self._pending.extend(pending.items())


def read_counters(session: Session, prefix: str) -> dict[str, int]:
    """Every counter whose name starts with ``prefix``, by name."""
    rows = session.execute(select(ServiceCounter.name, ServiceCounter.value)
                           .where(ServiceCounter.name.startswith(prefix, autoescape=True)))
    return dict(rows.tuples().all())


#: ``service_counters`` names of the binary cache (``/metrics``: circus_cache_*)
CACHE_REQUESTS = "cache_requests:"
CACHE_BYTES = "cache_bytes:"
CACHE_ERRORS = "cache_errors:"


_REQUEST_NAMES = {(kind, hit): f"{CACHE_REQUESTS}{kind}:{'hit' if hit else 'miss'}"
                  for kind in ("narinfo", "nar") for hit in (True, False)}
_BYTES_NAMES = {kind: f"{CACHE_BYTES}{kind}" for kind in ("narinfo", "nar")}


def count_cache_request(counts: Tally, kind: str, *, hit: bool, sent: int = 0) -> None:
    """A narinfo or NAR request answered (``hit``) or not found; ``sent``: body bytes
    this server sent (0 for HEAD, and for a NAR that S3 serves)."""
    counts.add(_REQUEST_NAMES[kind, hit])
    if sent:
        counts.add(_BYTES_NAMES[kind], sent)


def count_cache_error(counts: Tally, reason: str) -> None:
    counts.add(f"{CACHE_ERRORS}{reason}")


def init_app(app: Flask, engine: Engine) -> Tally:
    tally = Tally(engine)
    app.extensions["circus_counters"] = tally
    return tally


def tally(app: Flask | None = None) -> Tally:
    found: Tally = (app or current_app).extensions["circus_counters"]
    return found
