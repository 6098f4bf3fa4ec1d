"""Figures aggregated over all builds (stats, time series), recomputed at most every
``server.aggregate_cache_seconds`` per server process.

At a million builds one such figure costs a scan of the builds table: hundreds of
milliseconds, on every call of a page that dashboards poll. They are shown to the
second nowhere, so each process keeps the last answer per question (arguments and
the projects hidden from the caller) and serves it while a background thread
computes the next one once it is older than the TTL: no request waits for a scan
but the first. An answer older than ``STALE_FACTOR`` TTLs is recomputed in the
request (a process that was idle for long does not serve very old figures).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, TypeVar

from flask import current_app
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from circus.auth.actor import Actor
from circus.auth.visibility import hidden_project_ids
from circus.server.context import db_session, server_context

log = logging.getLogger(__name__)
T = TypeVar("T")
STALE_FACTOR = 10
#: answers kept per process (distinct argument combinations); the oldest go first
MAX_ENTRIES = 256


@dataclass
class _Entry:
    value: Any
    computed_at: float
    refreshing: bool = False


class AggregateCache:
    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._entries: dict[Hashable, _Entry] = {}
        self._lock = threading.Lock()

    def get(self, key: Hashable, compute: Callable[[Session], T], session: Session,
            engine: Engine) -> T:
        if self.ttl <= 0:
            return compute(session)
        now = time.monotonic()
        with self._lock:
            entry = self._entries.get(key)
            fresh = entry is not None and now - entry.computed_at < self.ttl
            usable = entry is not None and now - entry.computed_at < self.ttl * STALE_FACTOR
            refresh = entry is not None and usable and not fresh and not entry.refreshing
            if refresh:
                assert entry is not None
                entry.refreshing = True
        if entry is not None and usable:
            if refresh:
                threading.Thread(target=self._refresh, args=(key, compute, engine),
                                 name="aggregate-refresh", daemon=True).start()
            return entry.value  # type: ignore[no-any-return]
        value = compute(session)
        self._put(key, value)
        return value

    def _refresh(self, key: Hashable, compute: Callable[[Session], Any], engine: Engine) -> None:
        try:
            with Session(engine) as session:
                value = compute(session)
        except Exception:
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None:
                    entry.refreshing = False
            log.exception("refreshing an aggregate failed")
            return
        self._put(key, value)

    def _put(self, key: Hashable, value: Any) -> None:
        with self._lock:
            self._entries.pop(key, None)
            self._entries[key] = _Entry(value, time.monotonic())
            while len(self._entries) > MAX_ENTRIES:
                self._entries.pop(next(iter(self._entries)))


def cached(name: str, args: dict[str, Any], actor: Actor,
           compute: Callable[[Session], T]) -> T:
    """``compute(session)``, or its answer from at most the TTL ago (see module doc) to
    the same question: ``name`` with ``args``, asked by someone who may see the same
    projects as ``actor``."""
    context = server_context()
    extensions = current_app.extensions
    cache: AggregateCache | None = extensions.get("circus.aggregates")
    if cache is None:
        cache = extensions.setdefault("circus.aggregates", AggregateCache(
            context.settings.server.aggregate_cache_seconds))
    session = db_session()
    hidden = hidden_project_ids(actor)
    seen_by = None if hidden is None else frozenset(session.scalars(hidden))
    key = (name, tuple(sorted(args.items())), seen_by)
    return cache.get(key, compute, session, context.engine)
