"""A private RabbitMQ node for tests: never the machine's own RabbitMQ service.

Usage (the whole API)::

    with private_rabbitmq(tmp_dir, listen="0.0.0.0") as node:
        node.url              # amqp://circus:<password>@127.0.0.1:<port>//
        node.url_for(host.main_address)   # the same broker seen from a netns host
        node.ctl("list_queues", "name", "messages")   # rabbitmqctl against this node

Everything is its own: node name, AMQP port and Erlang distribution port (free
ports), an epmd on a free port (``ERL_EPMD_PORT``), the Mnesia and log
directories, the config file (a ``circus`` user with a random password, the
listener, a low disk alarm threshold for small test disks), the Erlang cookie
(``HOME``) and an empty plugins file; ``/etc/rabbitmq`` is not read. Erlang starts
in seconds, so tests share one node per session (the ``rabbitmq`` fixture of
tests/conftest.py) and tell their traffic apart by queue names or vhosts.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.helpers.daemons import Daemon
from tests.helpers.net import free_port

#: the scripts themselves: /usr/sbin/rabbitmq-server switches to the rabbitmq user
RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")
USER = "circus"


@dataclass
class RabbitNode:
    """A running private node; made by :func:`private_rabbitmq`."""

    node_name: str
    port: int
    password: str
    env: dict[str, str]
    daemon: Daemon
    listen: str = "127.0.0.1"

    def url_for(self, address: str) -> str:
        """The AMQP URL (default vhost ``/``) for a client reaching the node at ``address``."""
        return f"amqp://{USER}:{self.password}@{address}:{self.port}//"

    @property
    def url(self) -> str:
        """The AMQP URL from the main namespace (loopback)."""
        return self.url_for("127.0.0.1")

    def ctl(self, *args: str, timeout: float = 60) -> str:
        """``rabbitmqctl -n <node> args...``; its stdout (raises on failure)."""
        done = subprocess.run([str(RABBITMQ_BIN / "rabbitmqctl"), "-n", self.node_name, *args],
                              env=self.env, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {done.stderr.strip()}\n"
                               f"{self.daemon.log()[-3000:]}")
        return done.stdout


def _await_startup(node: RabbitNode, timeout: float) -> None:
    """``await_startup`` fails at once while the node is not registered with epmd yet."""
    deadline = time.monotonic() + timeout
    while True:
        done = subprocess.run(
            [str(RABBITMQ_BIN / "rabbitmqctl"), "-n", node.node_name, "--timeout",
             str(max(1, int(deadline - time.monotonic()))), "await_startup"],
            env=node.env, capture_output=True, text=True, timeout=timeout + 10)
        if done.returncode == 0:
            return
        if not node.daemon.alive() or time.monotonic() > deadline:
            raise RuntimeError(f"RabbitMQ did not start: {done.stderr.strip()[-2000:]}\n"
                               f"{node.daemon.log()[-3000:]}")
        time.sleep(0.5)


@contextmanager
def private_rabbitmq(directory: Path, listen: str = "127.0.0.1",
                     startup_timeout: float = 120) -> Iterator[RabbitNode]:
    """Start a node under ``directory`` listening on ``listen``; stopped (and its epmd) on exit.

    ``listen="0.0.0.0"`` makes it reachable from network-namespace hosts.
    """
    if not (RABBITMQ_BIN / "rabbitmq-server").exists():
        raise RuntimeError("rabbitmq-server is not installed (make setup installs it)")
    directory.mkdir(parents=True, exist_ok=True)
    port, dist_port, epmd_port = free_port(), free_port(), free_port()
    password = secrets.token_hex(12)
    node_name = f"circus-test-{os.getpid()}-{secrets.token_hex(3)}@localhost"
    config = directory / "rabbitmq.conf"
    config.write_text("\n".join([
        f"listeners.tcp.default = {listen}:{port}",
        f"default_user = {USER}",
        f"default_pass = {password}",
        "loopback_users = none",
        "disk_free_limit.absolute = 10MB",
        "log.console = false",
        "log.file.level = info",
    ]) + "\n")
    plugins = directory / "enabled_plugins"
    plugins.write_text("[].\n")
    home = directory / "home"
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
    env.update({
        "HOME": str(home),
        "ERL_EPMD_PORT": str(epmd_port),
        "RABBITMQ_NODENAME": node_name,
        "RABBITMQ_NODE_PORT": str(port),
        "RABBITMQ_DIST_PORT": str(dist_port),
        "RABBITMQ_CONFIG_FILE": str(config),
        "RABBITMQ_ADVANCED_CONFIG_FILE": str(directory / "advanced.config"),
        "RABBITMQ_CONF_ENV_FILE": str(directory / "rabbitmq-env.conf"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(plugins),
        "RABBITMQ_MNESIA_BASE": str(directory / "mnesia"),
        "RABBITMQ_LOG_BASE": str(directory / "log"),
        "RABBITMQ_PID_FILE": str(directory / "rabbitmq.pid"),
    })
    daemon = Daemon("rabbitmq", [str(RABBITMQ_BIN / "rabbitmq-server")], directory, env=env)
    node = RabbitNode(node_name, port, password, env, daemon, listen=listen)
    daemon.start()
    try:
        _await_startup(node, startup_timeout)
        yield node
    finally:
        if daemon.alive():
            subprocess.run([str(RABBITMQ_BIN / "rabbitmqctl"), "-n", node_name, "stop"],
                           env=env, capture_output=True, timeout=60, check=False)
        daemon.stop()
        # the node started an epmd of its own (ERL_EPMD_PORT): it must not outlive us
        epmd = shutil.which("epmd") or "/usr/lib/erlang/bin/epmd"
        subprocess.run([epmd, "-kill"], env=env, capture_output=True, check=False)
