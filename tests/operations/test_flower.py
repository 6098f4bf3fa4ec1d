"""Flower, started against Circus's broker, sees the tasks Circus's workers run."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests
from sqlalchemy.orm import Session, sessionmaker

from circus.common.enums import BuildStatus
from tests.helpers.daemons import Daemon, wait_until
from tests.helpers.net import free_port, wait_for_http
from tests.queue_runner.conftest import runner_config  # noqa: F401  (shared fixture)
from tests.queue_runner.daemons import runner_daemon
from tests.queue_runner.factories import instantiate, make_builds

JOBS = Path(__file__).resolve().parents[1] / "agents" / "fixtures" / "jobs.nix"


def flower_daemon(broker_url: str, port: int, log_dir: Path) -> Daemon:
    # Flower is a Celery subcommand (the `test` extra installs it)
    env = {**os.environ, "FLOWER_UNAUTHENTICATED_API": "true"}
    return Daemon("flower", [sys.executable, "-m", "celery", "--broker", broker_url, "flower",
                             "--address=127.0.0.1", f"--port={port}"], log_dir, env=env)


def test_flower_sees_the_queue_runners_worker_and_its_wake_up_tasks(
        runner_config: Callable[..., dict[str, Any]],  # noqa: F811
        committed_db: sessionmaker[Session], redis_url: str, nix_env: dict[str, str],
        nonce: str, tmp_path: Path) -> None:
    drv = instantiate(["plain1"], nonce, nix_env, expr=JOBS)["plain1"]
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    # broker.task_events: the worker sends events from its first task on (without it
    # Flower turns them on itself, a few seconds after it first sees the worker)
    config = runner_config(broker={"task_events": True})
    with runner_daemon("qr-flower", config, tmp_path, workers=1) as runner, \
            flower_daemon(redis_url, port, tmp_path) as flower:
        wait_until(lambda: "ready." in runner.log(), timeout=30, message="worker ready")
        try:
            wait_for_http(f"{api}/workers", timeout=60)
        except TimeoutError as exc:
            raise AssertionError(f"Flower did not start:\n{flower.log()[-3000:]}") from exc

        def workers() -> dict[str, Any]:
            found: dict[str, Any] = requests.get(f"{api}/workers?refresh=1", timeout=30).json()
            return found

        wait_until(lambda: any("qr-flower@" in name for name in workers()),
                   timeout=30, interval=1, message="Flower lists the runner's worker")
        with committed_db() as session:
            build = make_builds(session, {"plain1": drv})["plain1"]

        def finished() -> bool:
            with committed_db() as session:
                return session.get_one(type(build), build.id).status == BuildStatus.succeeded

        wait_until(finished, timeout=60, interval=0.5, message="build succeeded")

        def seen() -> dict[str, Any]:
            tasks: dict[str, Any] = requests.get(f"{api}/tasks", timeout=10).json()
            return {t["name"]: t for t in tasks.values() if t.get("name")}

        wait_until(lambda: "circus.queue_runner.tasks.wake" in seen(), timeout=30,
                   interval=1, message="Flower saw the wake-up task")
        wake = seen()["circus.queue_runner.tasks.wake"]
    assert wake["state"] == "SUCCESS"
    assert wake["worker"].startswith("queue-runner-qr-flower@")
