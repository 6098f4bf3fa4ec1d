"""A kombu Redis channel used after its connection's transport was closed raises the
broker's connection error, not ``AttributeError``.

When the broker goes away (Redis killed and restarted), Celery's consumer closes its
connection; closing the default channel restores the messages it had reserved, for
which the channel asks its pool for a client, whose parameters come from
``channel.connection.client``. If the transport was already closed (it sets that to
None) this raised ``AttributeError`` (kombu issues #582, #970 describe the same path),
which kombu's ``maybe_close_channel`` does not ignore: Celery logged "Unrecoverable
error" and circus-queue-runner exited 1 (seen in the fault suite's Redis round; the
supervisor restarted it and nothing was lost). As a connection error it is ignored like
any other during that close; the reserved wake-ups stay in Redis' unacked set for
the visibility timeout, and the reconciler repairs a lost wake-up anyway.
"""

from __future__ import annotations

from typing import Any

_guarded = False


def guard_closed_transport() -> None:
    """Install the guard (idempotent; before a Celery app connects)."""
    global _guarded
    if _guarded:
        return
    import redis
    from kombu.transport import redis as kombu_redis

    original = kombu_redis.Channel._connparams

    def _connparams(self: Any, asynchronous: bool = False) -> Any:
        if self.connection.client is None:
            raise redis.exceptions.ConnectionError("the broker connection is closed")
        return original(self, asynchronous)

    kombu_redis.Channel._connparams = _connparams
    _guarded = True
