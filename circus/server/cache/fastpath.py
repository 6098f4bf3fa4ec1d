"""A WSGI shortcut for narinfo answers already in the in-process cache.

Flask's request/response machinery costs tens of microseconds per request;
with 2 cores that alone caps narinfo throughput well below the 5,000/s a
binary cache is expected to serve. Answers the LRU already holds (hits and
recent misses) are therefore sent from here, before Flask is entered; every
other request, and every first lookup of a hash, goes through the Flask views,
which validate, query the database and fill the LRU. So this path never sees
input the views have not accepted once, and never touches the database or the
filesystem.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

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
                 counts: Tally) -> None:
        self.app = app
        self.index = index
        self.counts = counts
        self.cache_control = f"public, max-age={max_age}"

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse
                 ) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD")
        if method == "GET" or method == "HEAD":
            parsed = _parse(environ.get("PATH_INFO", ""))
            if parsed is not None:
                cached: Any = self.index.cached_narinfo(parsed[1], parsed[0])
                if cached is not ABSENT:
                    if cached is None:
                        count_cache_request(self.counts, "narinfo", hit=False)
                        return self._send(start_response, "404 NOT FOUND", _NOT_FOUND,
                                          "application/json", method)
                    count_cache_request(self.counts, "narinfo", hit=True,
                                        sent=len(cached) if method == "GET" else 0)
                    return self._send(start_response, "200 OK", cached, CONTENT_TYPE, method,
                                      self.cache_control)
        return self.app(environ, start_response)

    @staticmethod
    def _send(start_response: StartResponse, status: str, body: bytes, content_type: str,
              method: str, cache_control: str | None = None) -> Iterable[bytes]:
        headers = [("Content-Type", content_type), ("Content-Length", str(len(body)))]
        if cache_control:
            headers.append(("Cache-Control", cache_control))
        start_response(status, headers)
        return [body] if method == "GET" else []
