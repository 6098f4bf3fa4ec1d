"""Answering cache requests from ``narinfo_cache``, with a bounded in-process LRU.

A Nix client asks for many narinfo files, most of them missing (``WantMassQuery``).
Each answer (the rendered narinfo text, or "not here") is kept for a short
time, so a hit costs one dictionary lookup and no database round trip. A hash part
the in-memory index (``known.py``) does not hold is a miss without a query; the rest
is one prepared single-row query on a connection of the cache's own. Changes to
``narinfo_cache`` reach the index by NOTIFY, which also drops outdated answers; the
TTL bounds how long a deleted path can be announced when a notification was missed.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import psycopg2
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from circus.cache import records
from circus.common.config import CacheSettings
from circus.common.errors import Unavailable
from circus.common.pglisten import close_quietly, dedicated_connection
from circus.server.cache.known import Change, KnownHashes

log = logging.getLogger(__name__)

V = TypeVar("V")
_ABSENT = object()
#: lookup connections per server process: with the GIL, more than a few queries in
#: flight per process gain nothing (8 measured no faster than 4 on 2 cores)
DIRECT_CONNECTIONS = 4


class TtlLru(Generic[V]):
    """A thread-safe LRU whose entries also expire."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[object, tuple[float, V]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: object) -> V | object:
        """The value, or ``_ABSENT`` when unknown or expired."""
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return _ABSENT
            if item[0] < time.monotonic():
                del self._items[key]
                return _ABSENT
            self._items.move_to_end(key)
            return item[1]

    def put(self, key: object, value: V, ttl: float) -> None:
        with self._lock:
            self._items[key] = (time.monotonic() + ttl, value)
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def discard(self, key: object) -> None:
        with self._lock:
            self._items.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


#: the shared cache serves what visible projects built; a path only hidden projects
#: link to is served by their own (authenticated) caches alone; a remote worker's
#: input nobody built an output closure with (``worker_only``) by none of them
_SHARED = """
    AND NOT n.worker_only
    AND NOT (EXISTS (SELECT 1 FROM narinfo_projects np JOIN projects p ON p.id = np.project_id
                     WHERE np.store_path = n.store_path AND p.hidden)
             AND NOT EXISTS (SELECT 1 FROM narinfo_projects np
                             JOIN projects p ON p.id = np.project_id
                             WHERE np.store_path = n.store_path AND NOT p.hidden))"""
_NARINFO_COLUMNS = """n.store_path, n.url, n.compression, n.nar_hash, n.nar_size, n."references",
           n.file_hash, n.file_size, n.deriver, n.sig, n.ca"""
_PROJECT_JOIN = """JOIN narinfo_projects np ON np.store_path = n.store_path
    JOIN projects p ON p.id = np.project_id"""
#: name -> (parameter types, query): prepared once per connection ($1, $2 are the parameters)
STATEMENTS = {
    "circus_narinfo": ("text", f"""
        SELECT {_NARINFO_COLUMNS} FROM narinfo_cache n WHERE n.hash_part = $1 {_SHARED}"""),
    "circus_project_narinfo": ("text, text", f"""
        SELECT {_NARINFO_COLUMNS} FROM narinfo_cache n {_PROJECT_JOIN}
        WHERE n.hash_part = $1 AND p.name = $2 AND p.cache_enabled AND NOT n.worker_only"""),
    # the HTTP worker's event loop asks for every cold hash part that arrived while its
    # previous query was in flight at once (``httpworker.py``)
    "circus_narinfos": ("text[]", f"""
        SELECT n.hash_part, {_NARINFO_COLUMNS} FROM narinfo_cache n
        WHERE n.hash_part = ANY($1) {_SHARED}"""),
    "circus_nar": ("text", f"""
        SELECT DISTINCT n.storage FROM narinfo_cache n WHERE n.url = $1 {_SHARED}"""),
    "circus_project_nar": ("text, text", f"""
        SELECT DISTINCT n.storage FROM narinfo_cache n {_PROJECT_JOIN}
        WHERE n.url = $1 AND p.name = $2 AND p.cache_enabled AND NOT n.worker_only"""),
    "circus_project": ("text", "SELECT id, hidden FROM projects WHERE name = $1"),
    # a remote worker's lookups: any recorded path; the caller checks that the worker
    # holds a step needing it (``RemoteWorkers.fetchable``)
    "circus_any_narinfo": ("text", f"""
        SELECT {_NARINFO_COLUMNS} FROM narinfo_cache n WHERE n.hash_part = $1"""),
    "circus_any_nar": ("text", """
        SELECT n.storage, n.store_path FROM narinfo_cache n WHERE n.url = $1"""),
}


class DirectQueries:
    """The cache's lookups on a few autocommit connections of their own, each statement
    prepared once per connection.

    Through the engine a lookup cost three round trips (pre-ping, the query, the
    rollback closing the implicit transaction) plus planning: on a busy 2-core host the
    round trips alone were most of a cold narinfo request. Here it is one round trip
    (EXECUTE of a prepared statement). A connection that fails is dropped and the
    lookup tried once more on a new one (the database restarted); a second failure is
    ``Unavailable``.
    """

    def __init__(self, engine: Engine, size: int) -> None:
        self.engine = engine
        self._idle: list[Any] = []
        self._slots = threading.BoundedSemaphore(size)
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def rows(self, statement: str, *params: str) -> list[tuple[Any, ...]]:
        """The rows of ``STATEMENTS[statement]`` for ``params``."""
        if not self._slots.acquire(timeout=30):
            raise Unavailable("all cache database connections are busy")
        try:
            for attempt in (1, 2):
                connection = self._checkout()
                try:
                    with connection.cursor() as cursor:
                        cursor.execute(f"EXECUTE {statement}({', '.join(['%s'] * len(params))})",
                                       params)
                        found: list[tuple[Any, ...]] = cursor.fetchall()
                except psycopg2.Error as exc:
                    close_quietly(connection)
                    if attempt == 2 or isinstance(exc, psycopg2.ProgrammingError):
                        log.warning("cache lookup failed: %s", exc)
                        raise Unavailable("the cache database cannot be reached right now"
                                          ) from None
                    continue
                with self._lock:
                    self._idle.append(connection)
                return found
            raise AssertionError("unreachable")
        finally:
            self._slots.release()

    def _checkout(self) -> Any:
        with self._lock:
            if self._pid != os.getpid():
                # forked: the parent's connections are the parent's (closing them here
                # would end its sessions)
                self._idle, self._pid = [], os.getpid()
            if self._idle:
                return self._idle.pop()
        try:
            connection = dedicated_connection(self.engine)
            with connection.cursor() as cursor:
                for name, (types, sql) in STATEMENTS.items():
                    cursor.execute(f"PREPARE {name}({types}) AS {sql}")
        except (psycopg2.Error, SQLAlchemyError) as exc:
            log.warning("cache lookup cannot connect: %s", exc)
            raise Unavailable("the cache database cannot be reached right now") from None
        return connection

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        if self._pid == os.getpid():
            for connection in idle:
                close_quietly(connection)


@dataclass(frozen=True)
class NarLocation:
    url: str
    #: storages holding the file: {"local"}, {"s3"} or both
    storages: frozenset[str]


class CacheIndex:
    def __init__(self, engine: Engine, settings: CacheSettings) -> None:
        self.ttl = settings.narinfo_cache_ttl_secs
        self.negative_ttl = settings.negative_cache_ttl_secs
        self.narinfos: TtlLru[bytes | None] = TtlLru(settings.narinfo_cache_size)
        self.nars: TtlLru[NarLocation | None] = TtlLru(max(1024, settings.narinfo_cache_size // 4))
        self.projects: TtlLru[tuple[int, bool] | None] = TtlLru(1024)
        self.queries = DirectQueries(engine, DIRECT_CONNECTIONS)
        #: bumped (under ``_changes``) by every change the listener applies: an answer
        #: looked up while one arrived may predate it, so it is sent but not kept (a
        #: deletion's notification would otherwise be overtaken by the answer it outdates,
        #: which the LRU would then serve for narinfo_cache_ttl_secs)
        self.generation = 0
        self._changes = threading.Lock()
        self.known = KnownHashes(engine, self._changed)

    def close(self) -> None:
        self.known.stop()
        self.queries.close()

    def _changed(self, change: Change) -> None:
        """A change to narinfo_cache (from the index's listener): drop what it outdates."""
        kind, hashes = change
        with self._changes:
            self.generation += 1
            if kind == "+":
                # a miss remembered before the path was published; per-project misses
                # expire after negative_cache_ttl_secs
                for hash_part in hashes:
                    self.narinfos.discard((None, hash_part))
            else:
                # a path deleted or changed (signature, storage), or notifications that
                # may have been missed: rare, so simply forget every answer
                self.narinfos.clear()
                self.nars.clear()

    def _keep(self, lru: TtlLru[V], key: object, value: V, ttl: float, since: int) -> None:
        """Put an answer looked up from generation ``since`` into ``lru``, unless a change
        arrived meanwhile."""
        with self._changes:
            if self.generation == since:
                lru.put(key, value, ttl)

    def cached_narinfo(self, hash_part: str, project: str | None = None) -> bytes | object | None:
        """The cached answer (text, or None for a known miss) or ``_ABSENT``."""
        return self.narinfos.get((project, hash_part))

    def cached_public_project(self, name: str) -> bool:
        """Whether ``name`` is known (without a query) to be a project that is not hidden."""
        cached = self.projects.get(name)
        return cached is not _ABSENT and cached is not None and not cached[1]  # type: ignore[index]

    def project(self, name: str) -> tuple[int, bool] | None:
        """(id, hidden) of a project (callers checking access); kept as long as a narinfo
        answer, so a per-project cache request costs no extra query when it is known."""
        cached = self.projects.get(name)
        if cached is not _ABSENT:
            return cached  # type: ignore[return-value]
        rows = self.queries.rows("circus_project", name)
        found = (int(rows[0][0]), bool(rows[0][1])) if rows else None
        self.projects.put(name, found, self.ttl if found else self.negative_ttl)
        return found

    def narinfo(self, hash_part: str, project: str | None = None, *,
                remember: bool = True) -> bytes | None:
        """The narinfo text for a (validated) hash part, or None when not served.

        ``remember=False`` (a private cache) keeps the answer out of the LRU, so the
        WSGI fast path, which checks no credentials, never serves it.
        """
        cached = self.narinfos.get((project, hash_part)) if remember else _ABSENT
        if cached is not _ABSENT:
            return cached  # type: ignore[return-value]
        if self.known.surely_absent(hash_part):
            return None
        since = self.generation
        if project is None:
            rows = self.queries.rows("circus_narinfo", hash_part)
        else:
            rows = self.queries.rows("circus_project_narinfo", hash_part, project)
        return self.answer(hash_part, project, rows[0] if rows else None, since,
                           remember=remember)

    def answer(self, hash_part: str, project: str | None, row: tuple[Any, ...] | None,
               since: int, *, remember: bool = True) -> bytes | None:
        """The answer for the row a lookup found (``records.COLUMNS``, None: no row) in a
        query sent at ``generation`` ``since``; kept in the LRU unless ``remember`` is
        False or a change arrived meanwhile."""
        if row is None:
            if remember:
                self._keep(self.narinfos, (project, hash_part), None, self.negative_ttl, since)
            return None
        body = records.from_row(dict(zip(records.COLUMNS, row, strict=True))).render().encode()
        if remember:
            self._keep(self.narinfos, (project, hash_part), body, self.ttl, since)
        return body

    def any_narinfo(self, hash_part: str) -> tuple[str, bytes] | None:
        """(store path, narinfo text) of any recorded path, whoever may see it; never
        remembered (the caller decides who gets it)."""
        if self.known.surely_absent(hash_part):
            return None
        rows = self.queries.rows("circus_any_narinfo", hash_part)
        if not rows:
            return None
        info = records.from_row(dict(zip(records.COLUMNS, rows[0], strict=True)))
        return info.store_path, info.render().encode()

    def any_nar(self, url: str) -> tuple[NarLocation, set[str]] | None:
        """Where a NAR of any recorded path is and the store paths it holds; never
        remembered."""
        rows = self.queries.rows("circus_any_nar", url)
        if not rows:
            return None
        return (NarLocation(url, frozenset(row[0] for row in rows)),
                {str(row[1]) for row in rows})

    def nar(self, url: str, project: str | None = None) -> NarLocation | None:
        cached = self.nars.get((project, url))
        if cached is not _ABSENT:
            return cached  # type: ignore[return-value]
        since = self.generation
        if project is None:
            rows = self.queries.rows("circus_nar", url)
        else:
            rows = self.queries.rows("circus_project_nar", url, project)
        if not rows:
            self._keep(self.nars, (project, url), None, self.negative_ttl, since)
            return None
        location = NarLocation(url, frozenset(row[0] for row in rows))
        self._keep(self.nars, (project, url), location, self.ttl, since)
        return location


ABSENT = _ABSENT
