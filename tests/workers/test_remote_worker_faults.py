"""Remote Celery build workers stopped, killed or cancelled mid-build: a stopped worker
hands its step back, a killed one's lease lapses and another worker builds it, a cancel
stops the build on the worker.

(Apart from tests/workers/test_remote_worker.py so that both long files can run on two
pytest workers at once.)"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from circus.common.enums import BuildStatus
from circus.common.nix.derivation import read_derivation
from circus.queue_runner.service import cancel_build
from tests.agents.conftest import store_has
from tests.agents.test_integration import wait_builds
from tests.conftest import KeyPair
from tests.helpers.daemons import wait_until
from tests.queue_runner.conftest import runner_config  # noqa: F401  (shared fixture)
from tests.queue_runner.factories import instantiate, make_builds
from tests.workers.support import (
    JOBS,
    server_and_runner,
    step_rows,
    worker_in_own_store,
)

pytestmark = pytest.mark.slow


def test_a_stopped_worker_hands_its_step_back_and_a_killed_ones_is_re_leased(
        runner_config: Callable[..., dict[str, Any]],  # noqa: F811
        committed_db: sessionmaker[Session], nix_env: dict[str, str], nonce: str,
        tmp_path: Path, cache_key: KeyPair, redis_url: str) -> None:
    drv = instantiate(["slow"], nonce, nix_env, expr=JOBS)["slow"]

    def running_on() -> str | None:
        rows = step_rows(committed_db, [drv])  # none until the dispatcher made the step
        return str(rows[0].machine) if rows and rows[0].state == "running" else None

    def building(attempt: int) -> bool:
        """The step's log (streamed to the server; attempts append) shows the build's
        ``attempt``-th start."""
        rows = step_rows(committed_db, [drv])
        log = tmp_path / "logs" / Path(drv).name[:2] / f"{Path(drv).name}-{rows[0].id}.log"
        return log.exists() and log.read_bytes().count(b"slow start") >= attempt

    def attempts() -> int:
        with committed_db() as session:
            return int(session.execute(text("SELECT attempts FROM steps WHERE drv_path = :d"),
                                       {"d": drv}).scalar_one())

    with server_and_runner(runner_config, tmp_path, cache_key, lease_secs=6) as server:
        with committed_db() as session:
            [build] = make_builds(session, {"slow": drv}).values()
        # SIGTERM mid-build: the build stops and the step goes back at once, no attempt
        with worker_in_own_store("w1", tmp_path / "w1", server, redis_url) as w1:
            wait_until(lambda: running_on() == "w1" and building(1), timeout=90,
                       message="slow building on w1")
            stopped_at = time.monotonic()
            w1.stop()
        wait_until(lambda: step_rows(committed_db, [drv])[0].state == "queued", timeout=10,
                   message="the step handed back")
        assert time.monotonic() - stopped_at < 10
        assert attempts() == 0
        assert "step 1: handed back" in w1.log()
        # it left on purpose: no stale heartbeat makes /health say "degraded"
        with committed_db() as session:
            assert not session.execute(text(
                "SELECT 1 FROM service_heartbeats WHERE service = 'remote-worker:w1'")).first()
        # kill -9 mid-build: the lease lapses (6 s) and another worker builds it
        with worker_in_own_store("w2", tmp_path / "w2", server, redis_url) as w2:
            wait_until(lambda: running_on() == "w2" and building(2), timeout=90,
                       message="slow building on w2")
            w2.kill()
        with committed_db() as session:
            assert session.execute(text(
                "SELECT 1 FROM service_heartbeats WHERE service = 'remote-worker:w2'")).first()
        with worker_in_own_store("w3", tmp_path / "w3", server, redis_url) as w3:
            result = wait_builds(committed_db, [build.id], timeout=120)
            w3_log = w3.log()
    assert result == {build.id: BuildStatus.succeeded}, w3_log[-3000:]
    [row] = step_rows(committed_db, [drv])
    assert row.machine == "w3"
    assert attempts() == 1  # the lapsed lease counted; the handed-back one did not


def test_a_cancelled_step_stops_building_on_the_worker(
        runner_config: Callable[..., dict[str, Any]],  # noqa: F811
        committed_db: sessionmaker[Session], nix_env: dict[str, str], nonce: str,
        tmp_path: Path, cache_key: KeyPair, redis_url: str) -> None:
    drv = instantiate(["slow"], nonce, nix_env, expr=JOBS)["slow"]
    output = read_derivation(drv).output_paths["out"]
    with server_and_runner(runner_config, tmp_path, cache_key) as server, \
            worker_in_own_store("w1", tmp_path / "w1", server, redis_url) as worker:
        with committed_db() as session:
            [build] = make_builds(session, {"slow": drv}).values()
        wait_until(lambda: any(b"slow start" in p.read_bytes()
                               for p in (tmp_path / "logs").rglob("*slow*.log")),
                   timeout=90, message="slow building on w1")
        with committed_db() as session:
            cancel_build(session, build.id, reason="test")
            session.commit()
        # the renewal answers "lost" (every <= 2 s) and the worker kills the build
        wait_until(lambda: "step 1: stopped (cancelled)" in worker.log(), timeout=15,
                   message="the build stopped on the worker")
        worker_log = worker.log()
    assert "step 1 was taken away; stopping its build" in worker_log
    # killed before the builder wrote its output (it sleeps 6 s first)
    assert not store_has(tmp_path / "w1", output)
    [row] = step_rows(committed_db, [drv])
    assert row.state == "done", row
