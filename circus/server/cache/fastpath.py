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
"""

from __future__ import annotations

import json
from collections.abc import Iterable
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


class NarinfoFastPath:
    def __init__(self, app: WSGIApplication, index: CacheIndex, max_age: int,
                 counts: Tally, headers: list[tuple[str, str]]) -> None:
        self.app = app
        self.index = index
        self.counts = counts
        #: what every answer of the app carries (``security.response_headers``)
        self.headers = headers
        self.cache_control = f"public, max-age={max_age}"

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

    def _answer(self, project: str | None, hash_part: str) -> Any:
        """The text, None for a miss, or ``ABSENT``: Flask's views must answer."""
        cached = self.index.cached_narinfo(hash_part, project)
        # a per-project cache is answered here only when its project is known to be
        # public: a hidden or unknown one needs the views' credential checks
        if cached is ABSENT and (project is None or self.index.cached_public_project(project)):
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
