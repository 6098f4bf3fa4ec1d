"""Connections of their own, outside the engine's pool: LISTEN, and hot single-row reads.

Both kinds stay open for a long time in one state (listening, or holding prepared
statements), so they never go back to the pool, where anyone could get them.
"""

from __future__ import annotations

import logging
import select
from typing import Any

from sqlalchemy import Engine

log = logging.getLogger(__name__)


def dedicated_connection(engine: Engine) -> Any:
    """A new autocommit psycopg2 connection made with ``engine``'s settings, ours for good."""
    raw = engine.raw_connection()
    raw.detach()
    connection: Any = raw.dbapi_connection
    connection.autocommit = True
    return connection


def close_quietly(connection: Any) -> None:
    try:
        connection.close()
    except Exception:
        log.debug("closing a dedicated connection failed", exc_info=True)


class Listener:
    """A dedicated autocommit connection LISTENing on some channels."""

    def __init__(self, engine: Engine, channels: list[str]) -> None:
        self.engine = engine
        self.channels = channels
        self.connection: Any = None

    def open(self) -> None:
        connection = dedicated_connection(self.engine)
        with connection.cursor() as cursor:
            for channel in self.channels:
                cursor.execute(f'LISTEN "{channel}"')
        self.connection = connection

    def close(self) -> None:
        if self.connection is not None:
            close_quietly(self.connection)
            self.connection = None

    def receive(self, timeout: float) -> list[tuple[str, str]]:
        """(channel, payload) of the notifications that arrive within ``timeout`` seconds,
        in the order they were sent (empty: timed out)."""
        if self.connection is None:
            self.open()
        ready, _, _ = select.select([self.connection], [], [], timeout)
        if not ready:
            return []
        self.connection.poll()
        received = [(n.channel, n.payload) for n in self.connection.notifies]
        self.connection.notifies.clear()
        return received

    def wait(self, timeout: float) -> set[str]:
        """Channels notified within ``timeout`` seconds (empty set: timed out)."""
        return {channel for channel, _ in self.receive(timeout)}
