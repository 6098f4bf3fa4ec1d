"""Answering cache requests from ``narinfo_cache``, with a bounded in-process LRU.

A Nix client asks for many narinfo files, most of them missing (``WantMassQuery``).
Each answer (the rendered narinfo text, or "not here") is kept for a short
time, so a hit costs one dictionary lookup and no database round trip. The TTL
bounds how long a retention-deleted path can still be announced.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Generic, TypeVar

from sqlalchemy import Engine, text

from circus.cache import records
from circus.common.config import CacheSettings

V = TypeVar("V")
_ABSENT = object()


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

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


#: the shared cache serves what visible projects built; a path only hidden projects
#: link to is served by their own (authenticated) caches alone
_SHARED = """
    AND NOT (EXISTS (SELECT 1 FROM narinfo_projects np JOIN projects p ON p.id = np.project_id
                     WHERE np.store_path = n.store_path AND p.hidden)
             AND NOT EXISTS (SELECT 1 FROM narinfo_projects np
                             JOIN projects p ON p.id = np.project_id
                             WHERE np.store_path = n.store_path AND NOT p.hidden))"""
_NARINFO_SQL = text(f"""
    SELECT n.store_path, n.url, n.compression, n.nar_hash, n.nar_size, n."references",
           n.file_hash, n.file_size, n.deriver, n.sig, n.ca
    FROM narinfo_cache n WHERE n.hash_part = :hash_part {_SHARED}
""")
_PROJECT_NARINFO_SQL = text("""
    SELECT n.store_path, n.url, n.compression, n.nar_hash, n.nar_size, n."references",
           n.file_hash, n.file_size, n.deriver, n.sig, n.ca
    FROM narinfo_cache n
    JOIN narinfo_projects np ON np.store_path = n.store_path
    JOIN projects p ON p.id = np.project_id
    WHERE n.hash_part = :hash_part AND p.name = :project AND p.cache_enabled
""")
_NAR_SQL = text(f"SELECT DISTINCT n.storage FROM narinfo_cache n WHERE n.url = :url {_SHARED}")
_PROJECT_SQL = text("SELECT id, hidden FROM projects WHERE name = :name")
_PROJECT_NAR_SQL = text("""
    SELECT DISTINCT n.storage FROM narinfo_cache n
    JOIN narinfo_projects np ON np.store_path = n.store_path
    JOIN projects p ON p.id = np.project_id
    WHERE n.url = :url AND p.name = :project AND p.cache_enabled
""")


@dataclass(frozen=True)
class NarLocation:
    url: str
    #: storages holding the file: {"local"}, {"s3"} or both
    storages: frozenset[str]


class CacheIndex:
    def __init__(self, engine: Engine, settings: CacheSettings) -> None:
        self.engine = engine
        self.ttl = settings.narinfo_cache_ttl_secs
        self.negative_ttl = settings.negative_cache_ttl_secs
        self.narinfos: TtlLru[bytes | None] = TtlLru(settings.narinfo_cache_size)
        self.nars: TtlLru[NarLocation | None] = TtlLru(max(1024, settings.narinfo_cache_size // 4))
        self.projects: TtlLru[tuple[int, bool] | None] = TtlLru(1024)

    def cached_narinfo(self, hash_part: str, project: str | None = None) -> bytes | object | None:
        """The cached answer (text, or None for a known miss) or ``_ABSENT``."""
        return self.narinfos.get((project, hash_part))

    def project(self, name: str) -> tuple[int, bool] | None:
        """(id, hidden) of a project (callers checking access); kept as long as a narinfo
        answer, so a per-project cache request costs no extra query when it is known."""
        cached = self.projects.get(name)
        if cached is not _ABSENT:
            return cached  # type: ignore[return-value]
        with self.engine.connect() as conn:
            row = conn.execute(_PROJECT_SQL, {"name": name}).first()
        found = (int(row.id), bool(row.hidden)) if row is not None else None
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
        with self.engine.connect() as conn:
            if project is None:
                row = conn.execute(_NARINFO_SQL, {"hash_part": hash_part}).mappings().first()
            else:
                row = conn.execute(_PROJECT_NARINFO_SQL, {
                    "hash_part": hash_part, "project": project}).mappings().first()
        if row is None:
            if remember:
                self.narinfos.put((project, hash_part), None, self.negative_ttl)
            return None
        body = records.from_row(row).render().encode()
        if remember:
            self.narinfos.put((project, hash_part), body, self.ttl)
        return body

    def nar(self, url: str, project: str | None = None) -> NarLocation | None:
        cached = self.nars.get((project, url))
        if cached is not _ABSENT:
            return cached  # type: ignore[return-value]
        with self.engine.connect() as conn:
            if project is None:
                storages = conn.execute(_NAR_SQL, {"url": url}).scalars().all()
            else:
                storages = conn.execute(_PROJECT_NAR_SQL, {
                    "url": url, "project": project}).scalars().all()
        if not storages:
            self.nars.put((project, url), None, self.negative_ttl)
            return None
        location = NarLocation(url, frozenset(storages))
        self.nars.put((project, url), location, self.ttl)
        return location


ABSENT = _ABSENT
