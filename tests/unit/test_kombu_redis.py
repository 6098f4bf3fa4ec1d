"""The guard of circus.common.kombu_redis, on a real Redis broker connection."""

from __future__ import annotations

import pytest
import redis
from kombu import Connection

from circus.common.kombu_redis import guard_closed_transport


def test_a_channel_of_a_closed_transport_raises_a_connection_error(redis_url: str) -> None:
    guard_closed_transport()
    connection = Connection(redis_url)
    channel = connection.default_channel
    assert channel._connparams()["db"] is not None   # open: the connection's parameters
    # what Celery's consumer leaves when the broker goes away: the transport closed,
    # the default channel still to be closed (it restores its reserved messages)
    transport = connection.transport
    connection._do_close_transport()
    assert transport.client is None
    with pytest.raises(redis.exceptions.ConnectionError):
        channel._connparams()
    # kombu's close of the channel ignores connection errors: no AttributeError escapes
    assert isinstance(redis.exceptions.ConnectionError("x"), connection.connection_errors)
