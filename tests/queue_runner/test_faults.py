"""Fault tests: kill -9 of a worker, a Redis restart, two dispatchers at once."""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from circus.common.enums import BuildStatus
from circus.common.localservices import PrivateRedis
from tests.helpers.audit import finish_counts
from tests.helpers.daemons import wait_until
from tests.queue_runner.daemons import runner_daemon
from tests.queue_runner.factories import FIXTURES, instantiate, make_builds
from tests.queue_runner.test_daemon import statuses, wait_finished, wait_ready

DAG = FIXTURES / "dag.nix"


def finishes(factory: sessionmaker[Session], kind: str) -> dict[int, int]:
    with factory() as session:
        return finish_counts(session.connection(), kind)


def dag_jobs(nonce: str, env: dict[str, str], **args: str | int) -> dict[str, str]:
    shape = " ".join(f"{k} = {v};" for k, v in args.items() if isinstance(v, int))
    attrs = subprocess.run(
        ["nix-instantiate", "--eval", "--json", "-E",
         f'builtins.attrNames (import {DAG} {{ nonce = "x"; {shape} }})'],
        capture_output=True, text=True, env=env, check=True).stdout
    return instantiate(json.loads(attrs), nonce, env, expr=DAG, args=args)


def test_two_runners_never_double_dispatch_and_survive_kill_9(
        runner_config: Callable[..., dict[str, Any]], committed_db: sessionmaker[Session],
        finish_audit: None, nix_env: dict[str, str], nonce: str, tmp_path: Path) -> None:
    drvs = dag_jobs(nonce, nix_env)
    long = instantiate(["wait"], nonce, nix_env, args={"sleep": "4"})
    config = runner_config(queue_runner={"workers": 2, "lease_secs": 4})
    with runner_daemon("qr-a", config, tmp_path) as a, \
            runner_daemon("qr-b", config, tmp_path) as b:
        wait_ready(a)
        wait_ready(b)
        # three evaluations of overlapping jobs, committed back to back: both
        # dispatchers wake for each and race to step the same derivations
        ids: list[int] = []
        names = sorted(drvs)
        with committed_db() as session:
            for part in (names[::2], names[1::2], names):
                ids += [x.id for x in make_builds(session, {j: drvs[j] for j in part}).values()]
        result = wait_finished(committed_db, ids)
        assert set(result.values()) == {BuildStatus.succeeded}
        with committed_db() as session:
            per_drv = session.execute(text(
                "SELECT drv_path, count(*) FROM steps GROUP BY drv_path")).tuples().all()
            retried = session.execute(text("SELECT count(*) FROM steps WHERE attempts > 0"
                                           )).scalar_one()
        assert len(per_drv) == len(drvs)
        assert all(count == 1 for _, count in per_drv), "a derivation got two steps"
        assert retried == 0
        assert set(finishes(committed_db, "step").values()) == {1}
        assert set(finishes(committed_db, "build").values()) == {1}
        assert len(finishes(committed_db, "build")) == len(ids)

        # kill -9 whichever runner builds the long step: the other one takes it over
        with committed_db() as session:
            build = make_builds(session, long)["wait"]

        def holder() -> str | None:
            with committed_db() as session:
                return session.execute(text(
                    "SELECT worker FROM steps WHERE drv_path = :d AND state = 'running'"),
                    {"d": long["wait"]}).scalar()

        wait_until(lambda: holder() is not None, timeout=20, message="long step running")
        victim, survivor = (a, b) if ":qr-a:" in (holder() or "") else (b, a)
        time.sleep(0.5)
        victim.kill()  # SIGKILL to the whole process group
        result = wait_finished(committed_db, [build.id], timeout=60)
        print(survivor.log()[-3000:])
    assert result[build.id] is BuildStatus.succeeded
    with committed_db() as session:
        step = session.execute(text(
            "SELECT id, worker, attempts, status FROM steps WHERE drv_path = :d"),
            {"d": long["wait"]}).one()
    assert f":{survivor.name}:" in step.worker
    assert step.attempts == 1
    assert finishes(committed_db, "step")[step.id] == 1
    assert finishes(committed_db, "build")[build.id] == 1


def test_redis_restart_mid_run(runner_config: Callable[..., dict[str, Any]],
                               committed_db: sessionmaker[Session], nix_env: dict[str, str],
                               nonce: str, tmp_path: Path) -> None:
    # a short path: Unix socket names are limited to ~100 bytes
    directory = Path(f"/tmp/circus-qr-redis-{secrets.token_hex(4)}")
    redis = PrivateRedis(directory, durable=False)
    redis.start()
    try:
        drvs = dag_jobs(nonce, nix_env, chains=3, length=6, fans=2, work="0.2")
        config = runner_config(broker={"url": redis.url},
                               queue_runner={"workers": 2, "republish_secs": 2})
        with runner_daemon("qr-redis", config, tmp_path) as daemon:
            wait_ready(daemon)
            with committed_db() as session:
                ids = [b.id for b in make_builds(session, drvs).values()]

            def done_steps() -> int:
                with committed_db() as session:
                    return int(session.execute(text(
                        "SELECT count(*) FROM steps WHERE state = 'done'")).scalar_one())

            wait_until(lambda: done_steps() >= 3, timeout=30, message="some steps built")
            redis.stop()
            time.sleep(2)
            redis.start()
            try:
                result = wait_finished(committed_db, ids, timeout=120)
            finally:
                print(daemon.log()[-4000:])
        assert set(result.values()) == {BuildStatus.succeeded}
        assert len(result) == len(drvs)
    finally:
        redis.stop()
        shutil.rmtree(directory, ignore_errors=True)


def test_statuses_helper_reads_rows(committed_db: sessionmaker[Session]) -> None:
    assert statuses(committed_db, []) == {}


def test_concurrent_dispatchers_step_each_build_once(
        qr_settings: Callable[..., Any], committed_db: sessionmaker[Session],
        nix_env: dict[str, str], nonce: str) -> None:
    """Four dispatcher threads racing over the same evaluations (no daemons)."""
    import threading

    from circus.common.db import in_transaction
    from circus.queue_runner.derivations import DrvCache
    from circus.queue_runner.dispatch.stepper import step_builds

    settings = qr_settings()
    drvs = dag_jobs(nonce, nix_env, chains=3, length=4, fans=2)
    names = sorted(drvs)
    with committed_db() as session:
        for part in (names[::2], names[1::2], names, names):
            make_builds(session, {j: drvs[j] for j in part})
    stepped: list[int] = []
    barrier = threading.Barrier(4)

    def dispatcher() -> None:
        cache = DrvCache()
        barrier.wait()
        while True:
            report = in_transaction(committed_db,
                                    lambda s: step_builds(s, settings, cache, limit=7))
            stepped.append(report.builds)
            if not report.builds:
                return

    threads = [threading.Thread(target=dispatcher) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    with committed_db() as session:
        total = session.execute(text("SELECT count(*) FROM builds")).scalar_one()
        per_drv = session.execute(text(
            "SELECT drv_path, count(*) FROM steps GROUP BY drv_path")).all()
        links = session.execute(text(
            "SELECT build_id, drv_path, count(*) FROM build_steps "
            "GROUP BY build_id, drv_path HAVING count(*) > 1")).all()
        unstepped = session.execute(text(
            "SELECT count(*) FROM builds WHERE stepped_at IS NULL")).scalar_one()
        queued = session.execute(text(
            "SELECT count(*) FROM steps WHERE state = 'queued'")).scalar_one()
    assert sum(stepped) == total  # every build stepped exactly once
    assert unstepped == 0
    assert len(per_drv) == len(drvs)
    assert {n for _, n in per_drv} == {1}
    assert links == []
    assert queued == 3  # the chain heads, once each
