"""circus-server's gunicorn worker: gthread, with narinfo requests answered on its event loop.

gunicorn's ``gthread`` worker hands every request on a kept-alive connection from its
event-loop thread to a pool thread and back (unregister the socket, a future, a pipe
write to wake the loop, register it again), then parses it with its Python HTTP
parser and builds a WSGI environ. For a narinfo request that machinery was nearly
all of the cost: ``bench/cache_serve.py`` measured hits and misses at the speed of a
do-nothing gunicorn app.

So when a kept-alive connection becomes readable, this worker peeks at what arrived.
When it is exactly one simple ``GET``/``HEAD`` of a narinfo
(``NarinfoFastPath.raw_response``: the same access rule, bytes and counts as the WSGI
fast path, which a private cache's requests never pass), it is answered here:

- from memory (an LRU hit, or a miss the index of recorded paths is sure of) at once;
- a shared-cache lookup only the database can answer (``ColdLookup``) by
  :class:`NarinfoBatches`: one query in flight per worker, on a non-blocking
  connection polled by the event loop, asking for every hash part that arrived while
  the previous query ran. The connection waits meanwhile, unregistered, with its
  request still unread; if the database fails, the requests go to the pool as if
  this worker had never looked at them.

Everything else — a first request on a new connection, any other URL, a per-project
cache's cold lookup, anything unusual about the request, TLS — goes to gthread's pool
unchanged, with the bytes still unread.
"""

from __future__ import annotations

import logging
import selectors
import socket
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

import psycopg2
import psycopg2.extensions
from gunicorn.workers.gthread import ThreadWorker
from sqlalchemy import Engine

from circus.common.pglisten import close_quietly
from circus.server.cache.fastpath import ColdLookup, NarinfoFastPath
from circus.server.cache.lookup import STATEMENTS

log = logging.getLogger(__name__)

#: the most a request answered on the event loop may take (a narinfo request with
#: the usual headers is a few hundred bytes); a longer one goes to the pool
PEEK_BYTES = 8192
#: after the batch connection failed, cold lookups go to the pool for this long
RETRY_SECS = 1.0
#: a query (or connecting) that takes longer is given up: its requests go to the pool
QUERY_TIMEOUT_SECS = 10.0
#: batch connections per worker (queries in flight at once)
LANES = 3


@dataclass
class Waiting:
    conn: Any  # gunicorn's TConn
    lookup: ColdLookup
    #: bytes of the request, still unread on the socket
    length: int


class CircusThreadWorker(ThreadWorker):  # type: ignore[misc]
    fastpath: NarinfoFastPath | None = None
    batches: NarinfoBatches | None = None

    def run(self) -> None:
        found = getattr(self.wsgi, "wsgi_app", None)
        if isinstance(found, NarinfoFastPath) and not self.cfg.is_ssl:
            self.fastpath = found
            self.batches = NarinfoBatches(self, found)
        try:
            super().run()
        finally:
            if self.batches is not None:
                self.batches.close()

    def on_client_socket_readable(self, conn: Any, client: Any) -> None:
        if self.fastpath is None or not self._answered_inline(conn, self.fastpath):
            super().on_client_socket_readable(conn, client)

    def wait_for_and_dispatch_events(self, timeout: float) -> None:
        super().wait_for_and_dispatch_events(timeout)
        # after every ready connection has been read: one query for all their lookups
        if self.batches is not None:
            self.batches.flush()

    def murder_keepalived(self, force: bool = False) -> None:
        super().murder_keepalived(force)
        if self.batches is not None:
            self.batches.check_timeout()

    def _answered_inline(self, conn: Any, fastpath: NarinfoFastPath) -> bool:
        """Whether the request waiting on ``conn`` is taken (answered, waiting for the
        database, or the connection closed) here; False leaves it, unread, to the pool."""
        if not self.alive or conn.is_http2 or conn.parser is None \
                or conn.parser.unreader.buf.getvalue():
            return False
        try:
            request = conn.sock.recv(PEEK_BYTES, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return True  # nothing to read after all: it stays registered
        except OSError:
            return False  # the pool's read sees the error and closes the connection
        if len(request) >= PEEK_BYTES:
            return False
        response = fastpath.raw_response(request)
        if response is None:
            return False
        if isinstance(response, ColdLookup):
            assert self.batches is not None
            if not self.batches.available():
                return False
            # off the poller until answered: a pipelined request must wait its turn
            self.poller.unregister(conn.sock)
            self.keepalived_conns.remove(conn)
            self.batches.add(Waiting(conn, response, len(request)))
            return True
        if self.send_answer(conn, len(request), response):
            # it moves to the end of the keep-alive queue, which stays ordered by timeout
            self.keepalived_conns.remove(conn)
            conn.set_timeout()
            self.keepalived_conns.append(conn)
        else:
            self.keepalived_conns.remove(conn)
            self.poller.unregister(conn.sock)
            self._close(conn)
        return True

    def send_answer(self, conn: Any, length: int, response: bytes) -> bool:
        """Read the ``length`` bytes of the request, send ``response``: False when that
        failed (the caller closes the connection)."""
        try:
            # the peeked bytes are in the socket's buffer, so this reads them all
            conn.sock.recv(length)
            sent: int = conn.sock.send(response)
        except OSError:
            return False
        # a short write: the client does not read its answers (a full socket buffer)
        return sent == len(response)

    def keep_alive(self, conn: Any) -> None:
        """Back on the poller, waiting for the connection's next request."""
        conn.set_timeout()
        self.keepalived_conns.append(conn)
        self.poller.register(conn.sock, selectors.EVENT_READ,
                             partial(self.on_client_socket_readable, conn))

    def _close(self, conn: Any) -> None:
        self.nr_conns -= 1
        conn.close()


class NarinfoBatches:
    """Cold shared-cache narinfo lookups on the worker's event loop: at the end of each
    round of events, one query for every lookup read since, on a connection of its own
    that has no query in flight (at most ``LANES``; while all are busy, lookups wait
    for the next one that ends). A query's round trip is then no longer a pause for
    every lookup read meanwhile, only for those it carries.
    """

    def __init__(self, worker: CircusThreadWorker, fastpath: NarinfoFastPath) -> None:
        self.worker = worker
        self.fastpath = fastpath
        self.lanes: list[BatchLane] = []
        self.waiting: list[Waiting] = []
        self.failed_at = -RETRY_SECS

    def available(self) -> bool:
        return time.monotonic() - self.failed_at >= RETRY_SECS

    def add(self, waiting: Waiting) -> None:
        """Ask for ``waiting`` with the next query (``flush`` sends it)."""
        self.waiting.append(waiting)

    def flush(self) -> None:
        """Send the lookups added since the last query on an idle lane, if there is one."""
        if not self.waiting:
            return
        idle = [lane for lane in self.lanes if lane.phase == "idle"]
        if not idle and len(self.lanes) < LANES:
            idle = [BatchLane(self)]
            self.lanes.append(idle[0])
        if idle:
            # a connected lane first: a new one has to connect and prepare
            lane = max(idle, key=lambda each: each.prepared)
            lane.waiting, self.waiting = self.waiting, []
            lane._next()

    def failed(self, exc: BaseException) -> None:
        """A lane failed: the lookups not yet sent go to the pool too."""
        log.warning("narinfo batch lookup failed, the thread pool answers for %s s: %s",
                    RETRY_SECS, exc)
        self.failed_at = time.monotonic()
        waiting, self.waiting = self.waiting, []
        for each in waiting:
            self.worker.enqueue_req(each.conn)

    def check_timeout(self) -> None:
        for lane in self.lanes:
            lane.check_timeout()

    def close(self) -> None:
        for lane in self.lanes:
            lane.close()


class BatchLane:
    """One non-blocking psycopg2 connection (``async_``) of ``NarinfoBatches`` with at
    most one query in flight: connecting, preparing the statement and each query are
    driven by ``poll()`` whenever the worker's selector says its socket is ready, so the
    loop never waits for the database."""

    def __init__(self, batches: NarinfoBatches) -> None:
        self.batches = batches
        self.worker = batches.worker
        self.fastpath = batches.fastpath
        self.index = batches.fastpath.index
        self.connection: Any = None
        self.cursor: Any = None
        self.phase = "idle"  # "connect" | "prepare" | "query" | "idle"
        self.prepared = False
        self.registered: int | None = None  # selector event the socket is registered for
        self.fd = -1  # the socket's number while registered
        self.started = 0.0
        #: lookups to send once connected, then those of the query in flight
        self.waiting: list[Waiting] = []
        self.asked: list[Waiting] = []
        #: the index's generation when the query in flight was sent
        self.asked_since = 0

    def _next(self) -> None:
        try:
            if self.connection is None:
                self.phase = "connect"
                self.connection = _connect_async(self.index.queries.engine)
            elif not self.prepared:
                self.phase = "prepare"
                self.cursor = self.connection.cursor()
                types, sql = STATEMENTS["circus_narinfos"]
                self.cursor.execute(f"PREPARE circus_narinfos({types}) AS {sql}")
            elif self.waiting:
                self.phase = "query"
                self.asked, self.waiting = self.waiting, []
                self.asked_since = self.index.generation
                self.cursor.execute("EXECUTE circus_narinfos(%s)",
                                    ([w.lookup.hash_part for w in self.asked],))
            else:
                self.phase = "idle"
                self._watch(None)
                return
            self.started = time.monotonic()
            self._poll()
        except (psycopg2.Error, OSError) as exc:
            self._fail(exc)

    def _poll(self, _fileobj: object = None) -> None:
        try:
            state = self.connection.poll()
        except (psycopg2.Error, OSError) as exc:
            self._fail(exc)
            return
        if state == psycopg2.extensions.POLL_READ:
            self._watch(selectors.EVENT_READ)
        elif state == psycopg2.extensions.POLL_WRITE:
            self._watch(selectors.EVENT_WRITE)
        else:  # POLL_OK
            if self.phase == "prepare":
                self.prepared = True
            elif self.phase == "query":
                try:
                    rows = self.cursor.fetchall()
                except psycopg2.Error as exc:
                    self._fail(exc)
                    return
                self._answer(rows)
                # the next query goes at the end of this round of events (``flush``), with
                # the lookups of every connection that round reads as well
                self.phase = "idle"
                self._watch(None)
                return
            self._next()

    def _answer(self, rows: list[tuple[Any, ...]]) -> None:
        found = {row[0]: row[1:] for row in rows}
        asked, self.asked = self.asked, []
        worker = self.worker
        for waiting in asked:
            hash_part = waiting.lookup.hash_part
            body = self.index.answer(hash_part, None, found.get(hash_part), self.asked_since)
            response = self.fastpath.raw_answer(body, waiting.lookup.head)
            if worker.send_answer(waiting.conn, waiting.length, response):
                worker.keep_alive(waiting.conn)
            else:
                worker._close(waiting.conn)

    def _watch(self, event: int | None) -> None:
        """Have the worker's selector call ``_poll`` when the socket is ready for
        ``event`` (None: not at all)."""
        if event == self.registered:
            return
        poller = self.worker.poller
        if event is None:
            poller.unregister(self.fd)
        elif self.registered is None:
            # kept: once the database ends the connection psycopg2 closes its socket and
            # ``fileno()`` fails, yet the selector still holds the number, which the
            # next accepted client socket may get
            self.fd = self.connection.fileno()
            poller.register(self.fd, event, self._poll)
        else:
            poller.modify(self.fd, event, self._poll)
        self.registered = event

    def check_timeout(self) -> None:
        if self.phase != "idle" and time.monotonic() - self.started > QUERY_TIMEOUT_SECS:
            self._fail(TimeoutError(f"no answer from the database in {QUERY_TIMEOUT_SECS} s"))

    def _fail(self, exc: BaseException) -> None:
        """Drop the connection; every request waiting goes to the pool, where the WSGI
        path answers it (with its own retry, or the usual JSON error)."""
        self._drop_connection()
        waiting, self.asked, self.waiting = [*self.asked, *self.waiting], [], []
        for each in waiting:
            self.worker.enqueue_req(each.conn)
        self.batches.failed(exc)

    def _drop_connection(self) -> None:
        if self.connection is not None:
            if self.registered is not None:
                try:
                    self.worker.poller.unregister(self.fd)
                except (OSError, KeyError, ValueError):
                    pass
            close_quietly(self.connection)
        self.connection = self.cursor = None
        self.registered = None
        self.prepared = False
        self.phase = "idle"

    def close(self) -> None:
        self._drop_connection()


def _connect_async(engine: Engine) -> Any:
    """A non-blocking connection with ``engine``'s URL (its connect settings apart from
    the statement timeout, which one lookup by key never reaches)."""
    args, kwargs = engine.dialect.create_connect_args(engine.url)
    kwargs.setdefault("application_name", "circus-narinfo-batches")
    return psycopg2.connect(*args, **kwargs, async_=True)


#: for gunicorn's ``worker_class`` setting
WORKER_CLASS = f"{CircusThreadWorker.__module__}.{CircusThreadWorker.__qualname__}"
