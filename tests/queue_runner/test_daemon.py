"""circus-queue-runner as a real process: Celery routing, LISTEN, statuses, actions."""

from __future__ import annotations

import hashlib
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from circus.common.enums import BuildStatus
from circus.queue_runner.derivations import DrvCache
from circus.queue_runner.local import procs
from circus.queue_runner.service import cancel_build, restart_build
from circus.queue_runner.steps.logs import read_log
from tests.helpers.daemons import wait_until
from tests.queue_runner.cgroups import memory_cgroup
from tests.queue_runner.daemons import runner_daemon
from tests.queue_runner.factories import instantiate, make_builds


def statuses(factory: sessionmaker[Session], ids: list[int]) -> dict[int, BuildStatus]:
    with factory() as session:
        rows = session.execute(text("SELECT id, status FROM builds WHERE id = ANY(:ids)"),
                               {"ids": ids}).all()
    return {r.id: BuildStatus(r.status) for r in rows}


def wait_finished(factory: sessionmaker[Session], ids: list[int], timeout: float = 90
                  ) -> dict[int, BuildStatus]:
    wait_until(lambda: all(s.is_finished for s in statuses(factory, ids).values()),
               timeout=timeout, interval=0.2, message="builds finished")
    return statuses(factory, ids)


def wait_ready(daemon: Any) -> None:
    wait_until(lambda: "ready." in daemon.log(), timeout=30, message="worker ready")


def test_every_status_from_real_derivations(runner_config: Callable[..., dict[str, Any]],
                                            committed_db: sessionmaker[Session],
                                            nix_env: dict[str, str], nonce: str,
                                            tmp_path: Path) -> None:
    plain = ["top", "fails", "needsFailing", "withOutput", "chatty", "needsFeature",
             "optionalFeature", "killed", "hog", "products"]
    drvs = instantiate([*plain, "slow", "silent"], nonce, nix_env)
    with memory_cgroup(f"circus-test-{nonce[:8]}", 192 * 1024 * 1024) as cgroup:
        config = runner_config(queue_runner={
            "max_log_size": 20000, "workers": 2,
            "local_features": ["circus-test-feature"], "build_cgroup": str(cgroup)})
        with runner_daemon("qr-statuses", config, tmp_path) as daemon:
            wait_ready(daemon)
            with committed_db() as session:
                builds = make_builds(session, {j: drvs[j] for j in plain})
                builds |= make_builds(session, {"slow": drvs["slow"]}, timeout=2)
                builds |= make_builds(session, {"silent": drvs["silent"]}, max_silent=2)
            ids = {job: b.id for job, b in builds.items()}
            try:
                result = wait_finished(committed_db, list(ids.values()))
            finally:
                print(daemon.log()[-6000:])
    expected = {
        "top": BuildStatus.succeeded,
        "fails": BuildStatus.failed,
        "needsFailing": BuildStatus.dependency_failed,
        "withOutput": BuildStatus.failed_with_output,
        "chatty": BuildStatus.log_limit_exceeded,
        "needsFeature": BuildStatus.unsupported_system,
        # its class appeared after the worker started: it subscribed on the fly
        "optionalFeature": BuildStatus.succeeded,
        "killed": BuildStatus.failed,  # SIGKILL without the OOM killer
        "hog": BuildStatus.oom_killed,
        "slow": BuildStatus.timeout,  # meta.timeout
        "silent": BuildStatus.timeout,  # meta.maxSilent
        "products": BuildStatus.succeeded,
    }
    assert {job: result[ids[job]] for job in expected} == expected
    assert "now consuming class x86_64-linux.circus-test-feature" in daemon.log()
    with committed_db() as session:
        products = session.execute(text(
            "SELECT type, subtype, name, sha256 FROM build_products WHERE build_id = :id "
            "ORDER BY type"), {"id": ids["products"]}).all()
        metrics = dict(session.execute(text(
            "SELECT name, value FROM build_metrics WHERE build_id = :id"),
            {"id": ids["products"]}).all())
        heartbeat = session.execute(text(
            "SELECT kind, details FROM service_heartbeats WHERE service LIKE :s"),
            {"s": "queue-runner-qr-statuses@%"}).one()
        failed_log = session.execute(text(
            "SELECT s.log_path, s.exit_code FROM steps s WHERE s.drv_path = :d"),
            {"d": drvs["fails"]}).one()
    assert [(p.type, p.subtype, p.name) for p in products] == [
        ("doc", "manual", "doc"), ("file", "binary-dist", "hello.txt")]
    assert products[1].sha256 == hashlib.sha256(b"hello product\n").hexdigest()
    assert metrics == {"runtime": 1.5, "coverage": 87.0}
    assert heartbeat.kind == "queue-runner"
    assert heartbeat.details["capabilities"][0]["supported_features"] == [
        "circus-test-feature"]
    assert failed_log.exit_code == 3
    assert b"about to fail" in read_log(failed_log.log_path)


def builder_pids(outputs: dict[str, str]) -> list[int]:
    return procs.builders_of(outputs)


def test_cancel_kills_the_running_builder_and_sigterm_hands_back(
        runner_config: Callable[..., dict[str, Any]], committed_db: sessionmaker[Session],
        nix_env: dict[str, str], nonce: str, tmp_path: Path) -> None:
    drvs = instantiate(["slow", "wait"], nonce, nix_env, args={"sleep": "30"})
    failing = instantiate(["fails"], nonce, nix_env)
    outputs = {job: DrvCache().get(drv).output_paths for job, drv in drvs.items()}
    config = runner_config(queue_runner={"workers": 2, "poll_interval": 60})
    with runner_daemon("qr-cancel", config, tmp_path) as daemon:
        wait_ready(daemon)
        # a failure, the same derivation again (cached), and a restart clearing it
        with committed_db() as session:
            first = make_builds(session, failing)["fails"]
        assert wait_finished(committed_db, [first.id])[first.id] is BuildStatus.failed
        with committed_db() as session:
            again = make_builds(session, failing)["fails"]
        assert wait_finished(committed_db, [again.id])[again.id] is BuildStatus.cached_failure
        with committed_db() as session:
            restart_build(session, again.id)
            session.commit()
        assert wait_finished(committed_db, [again.id])[again.id] is BuildStatus.failed
        with committed_db() as session:
            builds_of_drv = session.execute(text(
                "SELECT count(*) FROM steps WHERE drv_path = :d AND log_path IS NOT NULL"),
                {"d": failing["fails"]}).scalar_one()
        assert builds_of_drv == 2  # built, not built (cached), built again

        committed = time.monotonic()
        with committed_db() as session:
            builds = make_builds(session, drvs)
        # poll_interval is 60 s: only the NOTIFY can have started them this soon
        wait_until(lambda: builder_pids(outputs["slow"]) and builder_pids(outputs["wait"]),
                   timeout=20, message="both builders running")
        assert time.monotonic() - committed < 20
        with committed_db() as session:
            cancel_build(session, builds["slow"].id, reason="test")
            session.commit()
        wait_until(lambda: not builder_pids(outputs["slow"]), timeout=10,
                   message="the cancelled builder was killed")
        assert builder_pids(outputs["wait"]), "the other build must go on"
        os.killpg(daemon.pid, signal.SIGTERM)
        assert daemon.process is not None
        daemon.process.wait(20)
        wait_until(lambda: not builder_pids(outputs["wait"]), timeout=10,
                   message="shutdown stopped the builder")
    with committed_db() as session:
        slow = session.execute(text("SELECT status FROM builds WHERE id = :id"),
                               {"id": builds["slow"].id}).scalar_one()
        step = session.execute(text(
            "SELECT state, worker, attempts FROM steps WHERE drv_path = :d"),
            {"d": drvs["wait"]}).one()
    assert slow == BuildStatus.cancelled
    # handed back: queued again for the next runner, without counting an attempt
    assert (step.state, step.worker, step.attempts) == ("queued", None, 0)


def nix_store_pids(drv: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"nix-store") for a in argv[:6]) and drv.encode() in argv:
            found.append(int(pid))
    # Nix forks its builder child from nix-store: until that child execs it carries the same
    # command line, and it is part of the same attempt, not another one. Once its nix-store
    # is killed the child is an orphan (its parent init) that may still not have exec'd
    # on a loaded machine: an attempt is a nix-store the queue runner started.
    return [pid for pid in found if b"circus" in command_line(parent_pid(pid))]


def parent_pid(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat.rsplit(")", 1)[1].split()[1])


def command_line(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def test_infrastructure_failures_retry_then_abort(runner_config: Callable[..., dict[str, Any]],
                                                  committed_db: sessionmaker[Session],
                                                  nix_env: dict[str, str], nonce: str,
                                                  tmp_path: Path) -> None:
    drvs = instantiate(["wait"], nonce, nix_env, args={"sleep": "30"})
    config = runner_config(queue_runner={"workers": 1, "max_retries": 1})
    killed: set[int] = set()
    with runner_daemon("qr-abort", config, tmp_path) as daemon:
        wait_ready(daemon)
        with committed_db() as session:
            build = make_builds(session, drvs)["wait"]

        def kill_nix_store() -> bool:
            for pid in set(nix_store_pids(drvs["wait"])) - killed:
                os.kill(pid, signal.SIGKILL)  # nix-store dies: not the build's fault
                killed.add(pid)  # a killed process is seen again until it is reaped
            return statuses(committed_db, [build.id])[build.id].is_finished

        wait_until(kill_nix_store, timeout=60, interval=0.2, message="build finished")
    with committed_db() as session:
        step = session.execute(text(
            "SELECT status, attempts, error_message FROM steps WHERE drv_path = :d"),
            {"d": drvs["wait"]}).one()
        error = session.execute(text("SELECT error_message FROM builds WHERE id = :id"),
                                {"id": build.id}).scalar_one()
    assert statuses(committed_db, [build.id])[build.id] is BuildStatus.aborted
    assert len(killed) == 2  # the first attempt and one retry (max_retries = 1)
    assert step.attempts == 1
    assert "nix-store exited" in error
