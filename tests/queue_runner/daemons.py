"""Running ``circus-queue-runner`` (and ``circus-server``) daemons with a runner config as
real subprocesses."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tests.helpers.daemons import Daemon, circus_command
from tests.helpers.net import free_port


def flatten(config: Mapping[str, Any], prefix: str = "CIRCUS_") -> dict[str, str]:
    """``{"queue_runner": {"workers": 2}}`` → ``{"CIRCUS_QUEUE_RUNNER__WORKERS": "2"}``."""
    env: dict[str, str] = {}
    for key, value in config.items():
        name = prefix + key.upper()
        if isinstance(value, Mapping):
            env.update(flatten(value, name + "__"))
        elif isinstance(value, list):
            env[name] = json.dumps(value)
        elif isinstance(value, bool):
            env[name] = "true" if value else "false"
        elif value is None:
            continue
        else:
            env[name] = str(value)
    return env


def config_env(config: Mapping[str, Any]) -> dict[str, str]:
    """This environment without its ``CIRCUS_*`` variables, plus ``config``'s."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CIRCUS_")}
    env.update(flatten(config))
    return env


def server_daemon(config: Mapping[str, Any], log_dir: Path, host: str | None = None
                  ) -> tuple[Daemon, int]:
    """A ``circus-server`` with ``config`` on a free port (on ``host``, default
    server.host), not yet started, and the port."""
    port = free_port()
    argv = [circus_command("circus-server"), "--port", str(port)]
    if host:
        argv += ["--host", host]
    return Daemon("circus-server", argv, log_dir, env=config_env(config)), port


def runner_daemon(name: str, config: Mapping[str, Any], log_dir: Path, *,
                  workers: int | None = None, dispatcher: bool = True,
                  extra_env: Mapping[str, str] | None = None) -> Daemon:
    env = config_env(config)
    env.update(extra_env or {})
    argv = [circus_command("circus-queue-runner"), "--name", name]
    if workers is not None:
        argv += ["--workers", str(workers)]
    if not dispatcher:
        argv.append("--no-dispatcher")
    return Daemon(name, argv, log_dir, env=env)
