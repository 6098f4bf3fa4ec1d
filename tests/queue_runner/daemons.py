"""Running ``circus-queue-runner`` daemons as real subprocesses."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tests.helpers.daemons import Daemon, circus_command


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


def runner_daemon(name: str, config: Mapping[str, Any], log_dir: Path, *,
                  workers: int | None = None, dispatcher: bool = True,
                  extra_env: Mapping[str, str] | None = None) -> Daemon:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CIRCUS_")}
    env.update(flatten(config))
    env.update(extra_env or {})
    argv = [circus_command("circus-queue-runner"), "--name", name]
    if workers is not None:
        argv += ["--workers", str(workers)]
    if not dispatcher:
        argv.append("--no-dispatcher")
    return Daemon(name, argv, log_dir, env=env)
