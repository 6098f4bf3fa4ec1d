"""Which hash parts ``narinfo_cache`` holds, in memory, kept current by NOTIFY.

Most narinfo requests are for paths the cache does not have (a client asks every
substituter for every path it needs). With this index a server answers those
without a database round trip: a hash part the index does not hold is a 404.

The index only ever says "surely absent"; a hash part it holds still goes to the
database, which applies the access rules (hidden projects, per-project caches). So
a stale entry for a deleted path costs one query, never a wrong answer. The
opposite error — a path published after the index last heard from the database — is
bounded by how fast notifications arrive: narinfo_cache's triggers NOTIFY at commit
(``records.NARINFO_CHANNEL``), and the listener applies them in order.

The index is trusted only while its LISTEN connection is known to be up: it is
loaded after LISTEN (so nothing committed in between is lost), the connection is
pinged when idle, and any error makes every lookup go to the database until the
index has been loaded again. Each process (gunicorn worker) keeps its own, started
on first use. About 120 bytes per recorded path and process.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Callable

from sqlalchemy import Engine

from circus.cache.records import NARINFO_CHANNEL
from circus.common.pglisten import Listener

log = logging.getLogger(__name__)

#: how long the listener waits for a notification before it pings its connection: a
#: connection that died silently is noticed (and the index distrusted) within this
IDLE_PING_SECS = 5.0
#: the pause before reconnecting after the connection failed
RETRY_SECS = 1.0

#: a change to the cache: ("+" inserted | "~" changed | "-" deleted | "*" everything,
#: the hash parts concerned)
Change = tuple[str, list[str]]


def parse(payload: str) -> Change:
    """One notification of narinfo_cache's triggers."""
    kind, rest = payload[:1], payload[1:]
    return kind, rest.split(",") if rest else []


class KnownHashes:
    def __init__(self, engine: Engine, on_change: Callable[[Change], None]) -> None:
        self.engine = engine
        #: called (in the listener thread) for each change applied and with ("*", [])
        #: after every (re)load, so cached answers can be dropped
        self.on_change = on_change
        self._hashes: set[str] = set()
        self._live = False
        self._lock = threading.Lock()
        self._pid = -1
        self._stop = threading.Event()

    def surely_absent(self, hash_part: str) -> bool:
        """True only when the index is live and ``hash_part`` is not recorded."""
        if self._pid != os.getpid():
            self._start()
            return False
        return self._live and hash_part not in self._hashes

    @property
    def live(self) -> bool:
        return self._live and self._pid == os.getpid()

    def __len__(self) -> int:
        return len(self._hashes)

    def _start(self) -> None:
        with self._lock:
            if self._pid == os.getpid():
                return
            # a forked worker inherits no thread: each process listens for itself
            self._pid = os.getpid()
            self._live = False
            self._stop = threading.Event()
            thread = threading.Thread(target=_listen, args=(weakref.ref(self), self._stop),
                                      name="narinfo-index", daemon=True)
            thread.start()

    def stop(self) -> None:
        """Stop listening (the thread ends within ``IDLE_PING_SECS``); lookups then go to
        the database."""
        self._live = False
        self._stop.set()

    def _load(self, listener: Listener) -> None:
        with listener.connection.cursor() as cursor:
            cursor.execute("SELECT hash_part FROM narinfo_cache")
            self._hashes = {row[0] for row in cursor}
        self._live = True
        self.on_change(("*", []))
        log.info("narinfo index: %d recorded paths", len(self._hashes))

    def _apply(self, change: Change) -> None:
        kind, hashes = change
        if kind == "+":
            self._hashes.update(hashes)
        elif kind == "-":
            self._hashes.difference_update(hashes)
        self.on_change(change)


def _listen(ref: weakref.ref[KnownHashes], stop: threading.Event) -> None:
    """The listener thread: holds the index only weakly, so an index nobody uses any more
    (an app that was dropped) lets its thread and connection end."""
    failing = False
    while not stop.is_set():
        index = ref()
        if index is None:
            return
        listener = Listener(index.engine, [NARINFO_CHANNEL])
        try:
            listener.open()
            index._load(listener)
            failing = False
            del index
            while not stop.is_set():
                received = listener.receive(IDLE_PING_SECS)
                index = ref()
                if index is None:
                    return
                if not received:
                    with listener.connection.cursor() as cursor:
                        cursor.execute("SELECT 1")
                for _, payload in received:
                    change = parse(payload)
                    if change[0] == "*":
                        index._load(listener)
                    else:
                        index._apply(change)
                del index
        except Exception:
            # once per outage: it retries every RETRY_SECS
            log.log(logging.DEBUG if failing else logging.WARNING,
                    "narinfo index: no database connection; every lookup queries the "
                    "database until it is back", exc_info=True)
            failing = True
            index = ref()
            if index is not None:
                index._live = False
                index.on_change(("*", []))
            del index
        finally:
            listener.close()
        stop.wait(RETRY_SECS)
