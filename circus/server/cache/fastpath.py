"""A WSGI shortcut for narinfo requests of public caches.

Flask's request machinery (request context, session, login, CSRF and rate-limit
hooks) cost more than the lookup itself: with it, a cold narinfo request took
several milliseconds on a busy 2-core host. Narinfo requests of the shared cache,
and of per-project caches whose project is known to be public, are therefore
answered here, before Flask is entered: from the LRU, from the in-memory index of
recorded hash parts (a miss), or by one prepared query (``lookup.py``). The URL is
checked against the same strict patterns as the views before anything is looked
up, the answers carry the same headers as Flask's, and the access rule is the
views': the shared cache's query excludes paths only hidden projects built, and a
hidden or unknown project's cache is always left to the views, which check
credentials (its answers never enter the LRU), and so is a miss for a caller with
credentials (a remote worker's input of a hidden project). Everything else, and any
database error, goes to Flask.

``raw_response`` is the same answer for the HTTP worker's event loop
(``httpworker.py``): from memory only (the LRU, or a miss the index is sure of),
as the bytes of a whole HTTP/1.1 response, for a request simple enough to read
without gunicorn's parser; anything else is left to the thread pool and this WSGI
path.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from email.utils import formatdate
from typing import TYPE_CHECKING, Any

from circus.common.errors import Unavailable
from circus.common.nix import storepath
from circus.common.nix.narinfo import CONTENT_TYPE
from circus.server.cache.lookup import ABSENT, CacheIndex
from circus.server.counters import Tally, count_cache_request

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

_PREFIX = "/nix-cache/"
_PROJECTS = "/projects/"
_SUFFIX = ".narinfo"
#: a request the event loop may answer: GET or HEAD of an origin-form path, HTTP/1.1,
#: header fields of the plain form (token name, printable value) and nothing after
#: the blank line; anything else (HTTP/1.0, obs-fold, a body, pipelined requests)
#: goes to gunicorn's parser
_SIMPLE_REQUEST = re.compile(
    rb"(GET|HEAD) (/[!-~]*) HTTP/1\.1\r\n"
    rb"((?:[!#$%&'*+.^_`|~0-9A-Za-z-]+:[\t -~]*\r\n)*)\r\n\Z")
#: header fields that change how the connection or a body is read: left to gunicorn
#: (``Connection: keep-alive`` alone changes nothing in HTTP/1.1)
_FRAMING_FIELDS = re.compile(
    rb"(?:^|\n)(?:content-length|transfer-encoding|upgrade|expect|te|"
    rb"connection(?![ \t]*:[ \t]*keep-alive[ \t]*\r))[ \t]*:",
    re.IGNORECASE)
#: a caller with credentials may be a remote worker asking for an input only it may
#: read (a hidden project's, or one published for workers only): the views decide
_CREDENTIALS_FIELD = re.compile(rb"(?:^|\n)authorization[ \t]*:", re.IGNORECASE)
_NOT_FOUND = json.dumps({"error": "no such path in this cache", "details": None}).encode()


def _parse(path: str) -> tuple[str | None, str] | None:
    """(project, hash part) of a narinfo URL, or None when it is not one."""
    if not path.endswith(_SUFFIX):
        return None
    if path.startswith(_PREFIX):
        name = path[len(_PREFIX):-len(_SUFFIX)]
        project = None
    elif path.startswith(_PROJECTS):
        project, sep, rest = path[len(_PROJECTS):].partition("/nix-cache/")
        if not sep or "/" in project:
            return None
        name = rest[:-len(_SUFFIX)]
    else:
        return None
    if not storepath.is_hash_part(name):
        return None
    return project, name


@dataclass(frozen=True)
class ColdLookup:
    """A shared-cache narinfo request only the database can answer."""
    hash_part: str
    head: bool


class NarinfoFastPath:
    def __init__(self, app: WSGIApplication, index: CacheIndex, max_age: int,
                 counts: Tally, headers: list[tuple[str, str]]) -> None:
        self.app = app
        self.index = index
        self.counts = counts
        #: what every answer of the app carries (``security.response_headers``)
        self.headers = headers
        self.cache_control = f"public, max-age={max_age}"
        # the raw answers' header lines around Content-Length, in _send's order, after
        # the ones gunicorn writes itself
        fixed = "".join(f"{name}: {value}\r\n" for name, value in headers)
        self._raw_found = (f"Content-Type: {CONTENT_TYPE}\r\nContent-Length: ".encode(),
                           f"\r\n{fixed}Cache-Control: {self.cache_control}\r\n\r\n".encode())
        self._raw_missing = (b"Content-Type: application/json\r\nContent-Length: ",
                             f"\r\n{fixed}\r\n".encode())
        self._date = (0, b"")

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse
                 ) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD")
        if method == "GET" or method == "HEAD":
            parsed = _parse(environ.get("PATH_INFO", ""))
            if parsed is not None:
                answer = self._answer(*parsed)
                # a miss for a caller with credentials may be a remote worker's input
                # of a hidden project: the views check that
                if answer is None and environ.get("HTTP_AUTHORIZATION"):
                    answer = ABSENT
                if answer is not ABSENT:
                    if answer is None:
                        count_cache_request(self.counts, "narinfo", hit=False)
                        return self._send(start_response, "404 NOT FOUND", _NOT_FOUND,
                                          "application/json", method)
                    count_cache_request(self.counts, "narinfo", hit=True,
                                        sent=len(answer) if method == "GET" else 0)
                    return self._send(start_response, "200 OK", answer, CONTENT_TYPE, method,
                                      self.cache_control)
        return self.app(environ, start_response)

    def raw_response(self, request: bytes) -> bytes | ColdLookup | None:
        """The whole HTTP/1.1 response to ``request`` (the bytes of exactly one request)
        when memory answers it; a ``ColdLookup`` when only the database can answer for the
        shared cache (the worker asks it, then ``raw_answer``); else None: the worker hands
        the request to gunicorn and the WSGI app (this class's ``__call__`` first)."""
        match = _SIMPLE_REQUEST.match(request)
        if match is None or _FRAMING_FIELDS.search(match.group(3)) is not None \
                or _CREDENTIALS_FIELD.search(match.group(3)) is not None:
            return None
        parsed = _parse(match.group(2).decode("ascii"))
        if parsed is None:
            return None
        head = match.group(1) == b"HEAD"
        answer = self._answer(*parsed, query=False)
        if answer is ABSENT:
            project, hash_part = parsed
            # a per-project cache's cold lookup stays with the app (its query differs)
            return ColdLookup(hash_part, head) if project is None else None
        return self.raw_answer(answer, head)

    def raw_answer(self, answer: bytes | None, head: bool) -> bytes:
        """The HTTP/1.1 response for a narinfo text (None: a miss), counted."""
        if answer is None:
            count_cache_request(self.counts, "narinfo", hit=False)
            return self._raw(b"404 NOT FOUND", _NOT_FOUND, self._raw_missing, head)
        count_cache_request(self.counts, "narinfo", hit=True, sent=0 if head else len(answer))
        return self._raw(b"200 OK", answer, self._raw_found, head)

    def _raw(self, status: bytes, body: bytes, fields: tuple[bytes, bytes], head: bool
             ) -> bytes:
        now = int(time.time())
        if self._date[0] != now:
            self._date = (now, f"Date: {formatdate(now, usegmt=True)}\r\n".encode())
        return b"".join((b"HTTP/1.1 ", status, b"\r\nServer: gunicorn\r\n", self._date[1],
                         b"Connection: keep-alive\r\n", fields[0], str(len(body)).encode(),
                         fields[1], b"" if head else body))

    def _answer(self, project: str | None, hash_part: str, *, query: bool = True) -> Any:
        """The text, None for a miss, or ``ABSENT``: Flask's views must answer.
        ``query=False``: also ``ABSENT`` when only the database knows."""
        cached = self.index.cached_narinfo(hash_part, project)
        # a per-project cache is answered here only when its project is known to be
        # public: a hidden or unknown one needs the views' credential checks
        if cached is ABSENT and (project is None or self.index.cached_public_project(project)):
            if not query:
                return None if self.index.known.surely_absent(hash_part) else ABSENT
            try:
                return self.index.narinfo(hash_part, project)
            except Unavailable:
                return ABSENT  # the views answer with the usual JSON error
        return cached

    def _send(self, start_response: StartResponse, status: str, body: bytes,
              content_type: str, method: str, cache_control: str | None = None
              ) -> Iterable[bytes]:
        headers = [("Content-Type", content_type), ("Content-Length", str(len(body))),
                   *self.headers]
        if cache_control:
            headers.append(("Cache-Control", cache_control))
        start_response(status, headers)
        return [body] if method == "GET" else []
