"""circus-server's gunicorn worker: gthread, with narinfo answers from memory on its event loop.

gunicorn's ``gthread`` worker hands every request on a kept-alive connection from its
event-loop thread to a pool thread and back (unregister the socket, a future, a pipe
write to wake the loop, register it again), then parses it with its Python HTTP
parser and builds a WSGI environ. For a narinfo answer that memory holds (an LRU hit,
or a miss the index of recorded paths is sure of) that machinery is nearly all of the
cost: ``bench/cache_serve.py`` measured hits and misses at the speed of a
do-nothing gunicorn app.

So when a kept-alive connection becomes readable, this worker peeks at what arrived;
when it is exactly one simple ``GET``/``HEAD`` of a narinfo that
``NarinfoFastPath.raw_response`` answers from memory (same access rule, headers and
counts as the WSGI fast path: a private cache's answers are never in memory), the
request is consumed and answered right there, and the connection stays registered.
Everything else — a first request on a new connection, a lookup that needs the
database, any other URL, anything unusual about the request, TLS — goes to gthread's
pool unchanged, with the bytes still unread.
"""

from __future__ import annotations

import socket
from typing import Any

from gunicorn.workers.gthread import ThreadWorker

from circus.server.cache.fastpath import NarinfoFastPath

#: the most a request answered on the event loop may take (a narinfo request with
#: the usual headers is a few hundred bytes); a longer one goes to the pool
PEEK_BYTES = 8192


class CircusThreadWorker(ThreadWorker):  # type: ignore[misc]
    fastpath: NarinfoFastPath | None = None

    def run(self) -> None:
        found = getattr(self.wsgi, "wsgi_app", None)
        if isinstance(found, NarinfoFastPath) and not self.cfg.is_ssl:
            self.fastpath = found
        super().run()

    def on_client_socket_readable(self, conn: Any, client: Any) -> None:
        if self.fastpath is None or not self._answered_inline(conn, self.fastpath):
            super().on_client_socket_readable(conn, client)

    def _answered_inline(self, conn: Any, fastpath: NarinfoFastPath) -> bool:
        """Whether the request waiting on ``conn`` was answered (or the connection closed)
        here; False leaves it, unread, to the pool."""
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
        try:
            # the peeked bytes are in the socket's buffer, so this reads them all
            conn.sock.recv(len(request))
            sent = conn.sock.send(response)
        except OSError:
            sent = -1
        if sent != len(response):
            # the client does not read its answers (a full socket buffer) or went away
            self._close(conn)
            return True
        # it moves to the end of the keep-alive queue, which stays ordered by timeout
        self.keepalived_conns.remove(conn)
        conn.set_timeout()
        self.keepalived_conns.append(conn)
        return True

    def _close(self, conn: Any) -> None:
        self.keepalived_conns.remove(conn)
        try:
            self.poller.unregister(conn.sock)
        except (OSError, KeyError, ValueError):
            pass
        self.nr_conns -= 1
        conn.close()


#: for gunicorn's ``worker_class`` setting
WORKER_CLASS = f"{CircusThreadWorker.__module__}.{CircusThreadWorker.__qualname__}"
