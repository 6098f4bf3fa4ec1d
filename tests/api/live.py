"""A real ``circus-server`` process for tests that go over the network (and the CLI)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from tests.conftest import truncate_all
from tests.helpers.daemons import Daemon, circus_command
from tests.helpers.net import free_port, wait_for_http

ADMIN_KEY = "live-admin-key-0123456789abcdef"


@dataclass
class LiveServer:
    url: str
    env: dict[str, str]
    daemon: Daemon


def server_env(database_url: str, redis_url: str, state: Path, port: int,
               declarative: dict[str, Any] | None = None, **extra: str) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("CIRCUS_")}
    env.update({
        "CIRCUS_DATABASE__URL": database_url,
        "CIRCUS_BROKER__URL": redis_url,
        "CIRCUS_SERVER__SECRET_KEY": "live-secret-key-" + "x" * 32,
        "CIRCUS_SERVER__PORT": str(port),
        "CIRCUS_SERVER__WORKERS": "1",
        "CIRCUS_SERVER__RATE_LIMIT_API": "100000/minute",
        "CIRCUS_NIX__SUBSTITUTERS": "[]",
        "CIRCUS_EVALUATOR__WORK_DIR": str(state / "evaluator"),
        "CIRCUS_LOGS__LOG_DIR": str(state / "logs"),
        "CIRCUS_CACHE__CACHE_DIR": str(state / "cache"),
        "CIRCUS_GC__GC_ROOTS_DIR": str(state / "gcroots"),
    })
    declarative = declarative or {
        "users": [{"username": "root", "role": "admin"}],
        "api_keys": [{"name": "live-admin", "key": ADMIN_KEY, "role": "admin",
                      "owner": "root"}]}
    for section, items in declarative.items():
        env[f"CIRCUS_DECLARATIVE__{section.upper()}"] = json.dumps(items)
    env.update(extra)
    return env


@contextmanager
def live_server(engine: Engine, database_url: str, redis_url: str, state: Path,
                declarative: dict[str, Any] | None = None, **extra: str) -> Iterator[LiveServer]:
    truncate_all(engine)
    port = free_port()
    env = server_env(database_url, redis_url, state, port, declarative, **extra)
    daemon = Daemon("circus-server", [circus_command("circus-server")], state / "daemon-logs",
                    env=env)
    daemon.start()
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_for_http(url + "/health", timeout=60, expect=(200, 503))
        except TimeoutError as exc:
            raise AssertionError(f"circus-server did not start:\n{daemon.log()}") from exc
        yield LiveServer(url, env, daemon)
    finally:
        daemon.stop()
        truncate_all(engine)
