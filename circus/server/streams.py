"""Caps on live log streams (server-sent events), per client address and per process.

A stream holds one of the process's worker threads for as long as the build runs. Without
a cap, a few clients opening streams (or one opening many) take every thread and the
server stops answering anything else, ``/health`` included. Counts live in the process
(the threads they protect are the process's own), under a lock: gthread workers serve
requests concurrently.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from typing import Any

from flask import Flask, Response, current_app
from werkzeug.exceptions import TooManyRequests

from circus.common.config import Settings

#: what a refused client is told to wait before trying again (seconds)
RETRY_AFTER = 5


class StreamSlots:
    def __init__(self, total: int, per_client: int) -> None:
        self.total = total
        self.per_client = per_client
        self._lock = threading.Lock()
        self._open: dict[str, int] = {}

    def take(self, client: str) -> None:
        """Count one more stream of ``client``, or raise a 429 saying which cap is hit."""
        with self._lock:
            if self._open.get(client, 0) >= self.per_client:
                raise TooManyRequests(
                    f"too many live log streams from your address (at most "
                    f"{self.per_client}): close one first", retry_after=RETRY_AFTER)
            if sum(self._open.values()) >= self.total:
                raise TooManyRequests(
                    "too many live log streams on this server right now; try again later",
                    retry_after=RETRY_AFTER)
            self._open[client] = self._open.get(client, 0) + 1

    def give_back(self, client: str) -> None:
        with self._lock:
            left = self._open.get(client, 0) - 1
            if left > 0:
                self._open[client] = left
            else:
                self._open.pop(client, None)

    def held(self) -> int:
        with self._lock:
            return sum(self._open.values())


class HeldStream:
    """A response body that gives its slot back when the server closes it (the stream
    ended, or the client went away and the next write failed) — even if it was never
    iterated, which a plain generator's ``finally`` would miss."""

    def __init__(self, body: Iterable[Any], slots: StreamSlots, client: str) -> None:
        self.body = body
        self.slots = slots
        self.client = client
        self._closed = False

    def __iter__(self) -> Iterator[Any]:
        return iter(self.body)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            close = getattr(self.body, "close", None)
            if close is not None:
                close()
        finally:
            self.slots.give_back(self.client)


def init_app(app: Flask, settings: Settings) -> None:
    app.extensions["circus_streams"] = StreamSlots(settings.server.max_log_streams,
                                                   settings.server.max_log_streams_per_client)


def capped(client: str, make_response: Any) -> Response:
    """The streaming response ``make_response()`` builds, counted against the caps (429
    before anything is built when a cap is reached)."""
    slots: StreamSlots = current_app.extensions["circus_streams"]
    slots.take(client)
    try:
        response: Response = make_response()
    except BaseException:
        slots.give_back(client)
        raise
    response.response = HeldStream(response.response, slots, client)
    return response
