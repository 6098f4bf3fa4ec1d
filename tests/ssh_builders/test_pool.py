"""The SSH worker in this process against real sshd builders with their own stores."""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker

from circus.auth.actor import Actor
from circus.common.config import Settings
from circus.common.db import in_transaction
from circus.common.enums import BuildStatus
from circus.common.models import RemoteBuilder
from circus.common.nix.derivation import read_derivation
from circus.machines import service as machines
from circus.queue_runner.local import procs
from circus.queue_runner.service import cancel_build
from circus.queue_runner.ssh import remotebuild
from circus.queue_runner.ssh.pool import SshBuilders
from circus.queue_runner.steps.logs import read_log
from circus.queue_runner.steps.reconciler import live_consumers, reconcile
from tests.helpers.daemons import wait_until
from tests.queue_runner.conftest import Driver
from tests.queue_runner.factories import FIXTURES, instantiate, make_builds, make_jobset
from tests.ssh_builders.conftest import JOBS, SshHost, add_builders, keygen, ssh_settings

REPRO = FIXTURES / "repro.nix"


@contextmanager
def running_pool(settings: Settings, factory: sessionmaker[Session]
                 ) -> Iterator[tuple[SshBuilders, Driver]]:
    """The SSH worker thread plus a dispatcher driven from the test."""
    pool = SshBuilders(settings, factory, wakeups=False, instance="test")
    driver = Driver(settings, factory)
    pool.start()
    try:
        yield pool, driver
    finally:
        pool.stop.set()
        pool.join(30)


def step_until(driver: Driver, predicate: Callable[[], bool], timeout: float = 60,
               message: str = "condition") -> None:
    def check() -> bool:
        driver.step()
        return predicate()

    wait_until(check, timeout=timeout, interval=0.1, message=message)


def finished(driver: Driver, ids: list[int]) -> Callable[[], bool]:
    return lambda: all(s.is_finished for s in driver.statuses(ids).values())


def step_row(factory: sessionmaker[Session], drv: str) -> Any:
    with factory() as session:
        return session.execute(text(
            "SELECT * FROM steps WHERE drv_path = :d ORDER BY id DESC LIMIT 1"),
            {"d": drv}).mappings().one()


def builder_row(factory: sessionmaker[Session], name: str) -> Any:
    with factory() as session:
        return session.execute(text("SELECT * FROM remote_builders WHERE name = :n"),
                               {"n": name}).mappings().one()


def valid_here(path: str) -> bool:
    return subprocess.run(["nix-store", "--check-validity", path],
                          capture_output=True).returncode == 0


def outputs_of(factory: sessionmaker[Session], build_id: int) -> dict[str, str]:
    with factory() as session:
        return dict(session.execute(text(
            "SELECT name, path FROM build_outputs WHERE build_id = :b"), {"b": build_id}).all())


def test_statuses_cancel_and_shutdown_stop_the_remote_build(
        qr_settings: Callable[..., Settings], committed_db: sessionmaker[Session],
        ssh_host: Callable[[str], SshHost], nix_env: dict[str, str], nonce: str) -> None:
    host = ssh_host("b1")
    add_builders(committed_db, host.row(max_jobs=5))
    with committed_db() as session:
        # an earlier failure: the builder's next verdict ends it
        session.execute(text("UPDATE remote_builders SET consecutive_failures = 2, "
                             "disabled_until = now() - interval '1 s'"))
        session.commit()
    settings = qr_settings(queue_runner=ssh_settings(max_log_size=4096))
    jobs = ["fails", "chatty", "slow", "sleeper", "sleeper2"]
    drvs = instantiate(jobs, nonce, nix_env, expr=JOBS)
    with running_pool(settings, committed_db) as (pool, driver):
        with committed_db() as session:
            builds = make_builds(session, {j: drvs[j] for j in jobs if j != "slow"})
            builds.update(make_builds(session, {"slow": drvs["slow"]}, timeout=2))
        ids = {job: b.id for job, b in builds.items()}
        sleepers = {job: outputs_of(committed_db, ids[job]) for job in ("sleeper", "sleeper2")}
        step_until(driver, finished(driver, [ids[j] for j in ("fails", "chatty", "slow")]),
                   message="fails, chatty and slow finished")
        wait_until(lambda: all(procs.builders_of(o) for o in sleepers.values()), timeout=30,
                   message="both sleepers build")
        with committed_db() as session:
            assert session.scalars(select(RemoteBuilder)).one().current_jobs == 2
        # cancelling a build stops its builder on the remote machine
        with committed_db() as session:
            cancel_build(session, ids["sleeper"])
            session.commit()
        wait_until(lambda: not procs.builders_of(sleepers["sleeper"]), timeout=20,
                   message="the cancelled build was killed on the builder")
        wait_until(lambda: len(pool.running_steps()) == 1, timeout=20, message="slot freed")
    # leaving the context stopped the runner: the other sleeper was stopped and handed back
    assert not procs.builders_of(sleepers["sleeper2"])
    handed_back = step_row(committed_db, drvs["sleeper2"])
    assert handed_back["state"] == "queued"
    assert handed_back["attempts"] == 0
    expected = {"fails": BuildStatus.failed, "chatty": BuildStatus.log_limit_exceeded,
                "slow": BuildStatus.timeout}
    for job, status in expected.items():
        row = step_row(committed_db, drvs[job])
        assert BuildStatus(row["status"]) is status, (job, row["error_message"])
        assert row["machine"] == "b1"
    failed = step_row(committed_db, drvs["fails"])
    assert failed["exit_code"] == 3
    assert b"about to fail" in read_log(failed["log_path"])
    chatty = read_log(step_row(committed_db, drvs["chatty"])["log_path"])
    assert chatty.startswith(b"chatty-line-of-text")
    assert len(chatty) < 8192
    assert driver.statuses([ids["sleeper"]])[ids["sleeper"]] is BuildStatus.cancelled
    assert builder_row(committed_db, "b1")["consecutive_failures"] == 0


def test_host_keys_unreachable_builders_and_back_off(
        qr_settings: Callable[..., Settings], committed_db: sessionmaker[Session],
        ssh_host: Callable[..., SshHost], nix_env: dict[str, str], nonce: str) -> None:
    host = ssh_host("real")
    broken = ssh_host("broken", read_only_store=True)
    other_key = subprocess.run(["ssh-keygen", "-y", "-f", str(host.client_key)],
                               capture_output=True, text=True, check=True).stdout.strip()
    add_builders(
        committed_db,
        # the right machine, but the key given is another one
        host.row(name="wrongkey", public_host_key=f"127.0.0.1 {other_key}",
                 mandatory_features=["special"], supported_features=["special"]),
        # nobody listens there
        host.row(name="gone", ssh_uri="root@127.0.0.1:1", mandatory_features=["special"],
                 supported_features=["special"]),
        # no key at all while ssh_require_host_key is on: refused without trying
        host.row(name="nokey", public_host_key=None, mandatory_features=["special"],
                 supported_features=["special"]),
        # reachable, but its Nix cannot work (read-only /nix)
        broken.row(name="nonix", mandatory_features=["other"], supported_features=["other"]))
    settings = qr_settings(queue_runner=ssh_settings(ssh_backoff_secs=1,
                                                     unsupported_timeout=30))
    drvs = instantiate(["special", "other"], nonce, nix_env, expr=JOBS)
    with running_pool(settings, committed_db) as (_pool, driver):
        with committed_db() as session:
            make_builds(session, drvs)
        step_until(driver, lambda: builder_row(committed_db, "gone")["consecutive_failures"]
                   >= 2 and all(builder_row(committed_db, name)["consecutive_failures"] >= 1
                                for name in ("wrongkey", "nonix")),
                   timeout=30, message="the builders failed")
        wrong = builder_row(committed_db, "wrongkey")
        gone = builder_row(committed_db, "gone")
        nokey = builder_row(committed_db, "nokey")
        nonix = builder_row(committed_db, "nonix")
    assert "host key mismatch" in wrong["last_failure"], wrong["last_failure"]
    assert "SHA256:" in wrong["last_failure"]
    assert "cannot connect" in gone["last_failure"], gone["last_failure"]
    assert gone["disabled_until"] is not None
    assert "no public_host_key" in nokey["last_failure"], nokey["last_failure"]
    assert "could not copy the inputs to nonix" in nonix["last_failure"]
    assert "Read-only file system" in nonix["last_failure"], nonix["last_failure"]
    # never connected: nothing was built, no attempt counted, the step waits for a machine
    step = step_row(committed_db, drvs["special"])
    assert step["state"] == "queued"
    assert step["attempts"] == 0
    assert not host.has(drvs["special"])
    # given to a builder that failed to take its inputs: retried (attempts count)
    step = step_row(committed_db, drvs["other"])
    assert step["state"] == "queued"
    assert step["attempts"] >= 1
    assert "Read-only file system" in step["error_message"]


def test_reconciler_counts_builders_in_short_back_off_only(
        qr_settings: Callable[..., Settings], committed_db: sessionmaker[Session],
        ssh_host: Callable[[str], SshHost]) -> None:
    host = ssh_host("r")
    add_builders(committed_db,
                 host.row(name="resting", systems=["sys-a"]),
                 host.row(name="down", systems=["sys-b"]),
                 host.row(name="nokey", systems=["sys-c"], public_host_key=None))
    with committed_db() as session:
        session.execute(text("""
            UPDATE remote_builders SET consecutive_failures = 3,
                disabled_until = now() + CASE name WHEN 'resting' THEN interval '10 s'
                                                   ELSE interval '1 hour' END
            WHERE name IN ('resting', 'down')"""))
        session.commit()
    settings = qr_settings(queue_runner={"unsupported_timeout": 60})
    with committed_db() as session:
        systems = {s for caps in live_consumers(session, settings=settings)
                   for s in caps.systems}
    assert "sys-a" in systems
    assert "sys-b" not in systems
    assert "sys-c" not in systems
    lax = qr_settings(queue_runner={"unsupported_timeout": 60, "ssh_require_host_key": False})
    with committed_db() as session:
        systems = {s for caps in live_consumers(session, settings=lax) for s in caps.systems}
    assert "sys-c" in systems


def test_fixing_a_builders_connection_ends_its_back_off(
        committed_db: sessionmaker[Session], ssh_host: Callable[..., SshHost]) -> None:
    host = ssh_host("fixme")
    add_builders(committed_db, host.row(public_host_key=None))
    with committed_db() as session:
        session.execute(text("UPDATE remote_builders SET consecutive_failures = 5, "
                             "disabled_until = now() + interval '1 hour'"))
        session.commit()
        row = session.scalars(select(RemoteBuilder)).one()
        machines.update_builder(session, Actor.system(), row, {"max_jobs": 4})
        assert row.consecutive_failures == 5  # not a connection change
        machines.update_builder(session, Actor.system(), row,
                                {"public_host_key": host.host_key})
        session.commit()
        assert row.consecutive_failures == 0
        assert row.disabled_until is None


def test_outputs_are_fetched_when_the_stream_back_fails(
        qr_settings: Callable[..., Settings], committed_db: sessionmaker[Session],
        ssh_host: Callable[..., SshHost], nix_env: dict[str, str], nonce: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Normally outputs return on the build command's stdout; when that stream does not
    arrive, the runner asks for the closure and fetches what it lacks."""
    original = remotebuild.build_script

    def without_export(argv: list[str], outputs: list[str], import_inputs: bool) -> str:
        return original(argv, outputs, import_inputs).replace("nix-store --export", "true")

    monkeypatch.setattr(remotebuild, "build_script", without_export)
    host = ssh_host("b")
    add_builders(committed_db, host.row())
    settings = qr_settings(queue_runner=ssh_settings())
    drvs = instantiate(["top", "dep"], nonce, nix_env, expr=JOBS)
    with running_pool(settings, committed_db) as (_pool, driver):
        with committed_db() as session:
            builds = make_builds(session, {"top": drvs["top"]})
        step_until(driver, finished(driver, [builds["top"].id]), message="top finished")
    assert driver.statuses([builds["top"].id])[builds["top"].id] is BuildStatus.succeeded
    for job in ("top", "dep"):
        out = read_derivation(drvs[job]).output_paths["out"]
        assert valid_here(out), job
        assert host.has(out), job


def test_a_refused_builder_leaves_its_steps_unsupported(
        qr_settings: Callable[..., Settings], committed_db: sessionmaker[Session],
        ssh_host: Callable[..., SshHost], nix_env: dict[str, str], nonce: str) -> None:
    """Once its back-off outlasts ``unsupported_timeout``, a builder no longer keeps its
    classes alive: steps only it could take end ``unsupported_system``."""
    host = ssh_host("mitm")
    impostor = keygen(host.directory / "impostor")
    add_builders(committed_db, host.row(public_host_key=impostor, mandatory_features=["special"],
                                        supported_features=["special"]))
    settings = qr_settings(queue_runner=ssh_settings(ssh_backoff_secs=3,
                                                     unsupported_timeout=1))
    drvs = instantiate(["special"], nonce, nix_env, expr=JOBS)
    with running_pool(settings, committed_db) as (_pool, driver):
        with committed_db() as session:
            build = make_builds(session, drvs)["special"]

        def reconciled() -> bool:
            in_transaction(committed_db, lambda s: reconcile(s, settings))
            return driver.statuses([build.id])[build.id].is_finished

        step_until(driver, reconciled, timeout=30, message="the build finished")
    assert driver.statuses([build.id])[build.id] is BuildStatus.unsupported_system
    assert "host key mismatch" in builder_row(committed_db, "mitm")["last_failure"]
    assert not host.has(drvs["special"])


def test_reproducibility_is_checked_on_the_ssh_builder(
        qr_settings: Callable[..., Settings], committed_db: sessionmaker[Session],
        ssh_host: Callable[..., SshHost], nix_env: dict[str, str], nonce: str,
        caplog: pytest.LogCaptureFixture) -> None:
    """A jobset asking for checks: the builder that built a step rebuilds it with
    ``--check``; a differing output makes the build non_deterministic, naming it."""
    caplog.set_level(logging.INFO, logger="circus.queue_runner.ssh.step")
    host = ssh_host("repro")
    add_builders(committed_db, host.row())
    settings = qr_settings(queue_runner=ssh_settings())
    drvs = instantiate(["random", "stable"], nonce, nix_env, expr=REPRO)
    with running_pool(settings, committed_db) as (_pool, driver):
        with committed_db() as session:
            jobset = make_jobset(session)
            jobset.check_reproducibility = True
            builds = make_builds(session, drvs, jobset=jobset)
        ids = {job: b.id for job, b in builds.items()}
        step_until(driver, lambda: driver.statuses([ids["random"]])[ids["random"]]
                   is BuildStatus.non_deterministic, message="random non-deterministic")
        wait_until(lambda: any(drvs["stable"] in m and "is reproducible on repro" in m
                               for m in caplog.messages), message="stable checked")
    assert driver.statuses([ids["stable"]])[ids["stable"]] is BuildStatus.succeeded
    with committed_db() as session:
        message = session.execute(text("SELECT error_message FROM builds WHERE id = :id"),
                                  {"id": ids["random"]}).scalar_one()
    out = read_derivation(drvs["random"]).output_paths["out"]
    assert message == (f"not reproducible: output out ({out}) differs when rebuilt with "
                       "nix-store --check (on repro)")
