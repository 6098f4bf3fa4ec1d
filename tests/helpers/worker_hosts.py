"""``circus-worker`` processes on network-namespace hosts (tests and bench/scale_out.py).

Each worker runs in its host's network namespace with the host's own ``/nix``
(:func:`tests.helpers.netns.network_host` with ``nix_store``) and reaches the
server and the broker over TCP at the host's ``main_address`` only.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from tests.helpers.daemons import Daemon
from tests.helpers.netns import NetnsHost

ROOT = Path(__file__).resolve().parents[2]


def write_worker_config(directory: Path, name: str, server_url: str, broker_url: str,
                        token: str, slots: int, log_level: str = "INFO",
                        features: tuple[str, ...] = ()) -> Path:
    """``directory/worker.toml``: no substituters, work dir and spools under ``directory``."""
    config = directory / "worker.toml"
    directory.mkdir(parents=True, exist_ok=True)
    config.write_text(f"""
[worker]
name = "{name}"
server_url = "{server_url}"
token = "{token}"
broker_url = "{broker_url}"
work_dir = "{directory / 'work'}"
slots = {slots}
features = [{", ".join(f'"{f}"' for f in features)}]
heartbeat_secs = 1.0
[nix]
substituters = []
[nix.config]
# workers on one test machine share the kernel's users (see tests/agents/conftest.py)
"build-users-group" = ""
[tracing]
level = "{log_level}"
""")
    return config


def worker_on_host(host: NetnsHost, directory: Path, name: str, server_port: int,
                   broker_url: str, token: str, slots: int = 2) -> Daemon:
    """A worker (not started) on ``host``, its log in ``directory/<name>.log``;
    ``broker_url`` must already name an address the host reaches."""
    config = write_worker_config(directory, name, f"http://{host.main_address}:{server_port}",
                                 broker_url, token, slots)
    return host.daemon(name, worker_command(config), directory, env=worker_env())


def worker_command(config: Path) -> list[str]:
    """``circus-worker`` of this checkout with ``config``."""
    return [sys.executable, "-m", "circus.worker.main", "--config", str(config)]


def worker_env() -> dict[str, str]:
    """This environment without its ``CIRCUS_*`` variables, this checkout on the path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CIRCUS_")}
    env["PYTHONPATH"] = str(ROOT)
    return env


def ready(worker: Daemon, name: str) -> bool:
    """The worker's Celery consumer is up."""
    log = worker.log()
    return f"circus-worker-{name}@" in log and " ready." in log
