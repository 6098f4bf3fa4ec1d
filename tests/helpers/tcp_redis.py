"""A private Redis on TCP (``0.0.0.0``) for network-namespace hosts.

``PrivateRedis`` (circus.common.localservices) listens on a Unix socket only, which a
namespace host could still reach through the shared filesystem; shared-nothing tests
give their hosts a TCP URL instead::

    with tcp_redis(directory) as redis:
        redis.url                          # redis://:<password>@127.0.0.1:<port>/0
        redis.url_for(host.main_address)   # the same server seen from a host
"""

from __future__ import annotations

import secrets
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.helpers.daemons import Daemon
from tests.helpers.net import free_port


@dataclass
class TcpRedis:
    port: int
    password: str
    daemon: Daemon

    def url_for(self, address: str) -> str:
        return f"redis://:{self.password}@{address}:{self.port}/0"

    @property
    def url(self) -> str:
        return self.url_for("127.0.0.1")


@contextmanager
def tcp_redis(directory: Path, listen: str = "0.0.0.0") -> Iterator[TcpRedis]:
    """A password-protected, non-durable redis-server on a free port; stopped on exit."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server not found (apt install redis-server)")
    directory.mkdir(parents=True, exist_ok=True)
    port, password = free_port(), secrets.token_hex(12)
    daemon = Daemon("redis", [binary, "--port", str(port), "--bind", listen,
                              "--requirepass", password, "--save", "", "--appendonly", "no",
                              "--dir", str(directory), "--daemonize", "no"], directory)
    with daemon:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError as exc:
                if not daemon.alive() or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start:\n{daemon.log()[-2000:]}"
                                       ) from exc
                time.sleep(0.05)
        yield TcpRedis(port, password, daemon)
