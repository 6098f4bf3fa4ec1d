"""Reproducibility checks (jobset ``check_reproducibility``) on real Nix and PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker

from circus.common.enums import BuildStatus, NotificationType
from circus.common.models import NotificationConfig, NotificationTask
from circus.notifications.service import collect_events
from tests.helpers.daemons import wait_until
from tests.queue_runner.conftest import Driver
from tests.queue_runner.daemons import runner_daemon
from tests.queue_runner.factories import FIXTURES, instantiate, make_builds, make_jobset

REPRO = FIXTURES / "repro.nix"


def _rows(factory: sessionmaker[Session], ids: list[int]) -> dict[int, dict[str, Any]]:
    with factory() as session:
        rows = session.execute(text(
            "SELECT id, status, error_message, notification_pending_since FROM builds "
            "WHERE id = ANY(:ids)"), {"ids": ids}).mappings().all()
    return {row["id"]: dict(row) for row in rows}


def test_mismatch_is_non_deterministic_and_dependents_not_held(
        driver: Callable[..., Driver], committed_db: sessionmaker[Session],
        nix_env: dict[str, str], nonce: str) -> None:
    run = driver()
    drvs = instantiate(["random", "stable", "dependent"], nonce, nix_env, expr=REPRO)
    with committed_db() as session:
        jobset = make_jobset(session)
        jobset.check_reproducibility = True
        session.add(NotificationConfig(project_id=jobset.project_id,
                                       type=NotificationType.webhook,
                                       config={"url": "http://127.0.0.1:9/hook"}))
        builds = make_builds(session, drvs, jobset=jobset)
        random_out = session.execute(text(
            "SELECT path FROM build_outputs WHERE build_id = :id AND name = 'out'"),
            {"id": builds["random"].id}).scalar_one()
    ids = {job: b.id for job, b in builds.items()}
    statuses = run.run(list(ids.values()))
    assert statuses[ids["random"]] is BuildStatus.non_deterministic
    assert statuses[ids["stable"]] is BuildStatus.succeeded
    # both were rebuilt with --check (the dependent's jobset asks too: three checks)
    assert run.builder.stats["repro_checks"] == 3
    # released at the first success: built from the first output, not held by the check
    assert statuses[ids["dependent"]] is BuildStatus.succeeded
    rows = _rows(committed_db, list(ids.values()))
    message = rows[ids["random"]]["error_message"]
    assert isinstance(message, str)
    assert f"output out ({random_out}) differs" in message
    assert rows[ids["random"]]["notification_pending_since"] is not None
    assert rows[ids["stable"]]["error_message"] is None
    with committed_db() as session:
        # the dependent step finished before the check ended the random build
        finished: dict[str, object] = dict(session.execute(text("""
            SELECT b.job_name, s.finished_at FROM builds b
            JOIN build_steps bs ON bs.build_id = b.id AND bs.is_toplevel
            JOIN steps s ON s.id = bs.step_id WHERE b.id = ANY(:ids)"""),
            {"ids": list(ids.values())}).tuples().all())
        step_status = session.execute(text("""
            SELECT s.status FROM steps s JOIN build_steps bs ON bs.step_id = s.id
            WHERE bs.build_id = :id AND bs.is_toplevel"""), {"id": ids["random"]}).scalar_one()
    assert finished["dependent"] is not None
    # the status change is notified like any other
    with committed_db() as session, session.begin():
        collect_events(session, run.settings)
        payloads = [t.payload for t in session.scalars(
            select(NotificationTask).where(NotificationTask.build_id == ids["random"]))]
    assert [p["build"]["status"] for p in payloads] == ["non_deterministic"]
    # the step itself succeeded (its dependents used its output); only the build is marked
    assert BuildStatus(step_status) is BuildStatus.succeeded


def test_without_the_option_nothing_is_checked(
        driver: Callable[..., Driver], committed_db: sessionmaker[Session],
        nix_env: dict[str, str], nonce: str) -> None:
    run = driver()
    drvs = instantiate(["random"], nonce, nix_env, expr=REPRO)
    with committed_db() as session:
        builds = make_builds(session, drvs)
    build_id = builds["random"].id
    assert run.run([build_id])[build_id] is BuildStatus.succeeded
    assert run.builder.stats.get("repro_checks", 0) == 0


def test_meta_hydra_repeats_asks_for_a_check(
        driver: Callable[..., Driver], committed_db: sessionmaker[Session],
        nix_env: dict[str, str], nonce: str) -> None:
    run = driver()
    drvs = instantiate(["random"], nonce, nix_env, expr=REPRO)
    with committed_db() as session:
        # the jobset does not ask; the job's meta.hydra.repeats (imported as repeats) does
        builds = make_builds(session, drvs, repeats=1)
    build_id = builds["random"].id
    assert run.run([build_id])[build_id] is BuildStatus.non_deterministic
    assert run.builder.stats["repro_checks"] == 1


def test_the_daemon_checks_after_releasing_dependents(
        runner_config: Callable[..., dict[str, Any]], committed_db: sessionmaker[Session],
        nix_env: dict[str, str], nonce: str, tmp_path: Path) -> None:
    drvs = instantiate(["random", "stable", "dependent"], nonce, nix_env, expr=REPRO)
    with runner_daemon("qr-repro", runner_config(queue_runner={"workers": 2}),
                       tmp_path) as daemon:
        wait_until(lambda: "ready." in daemon.log(), timeout=30, message="worker ready")
        with committed_db() as session:
            jobset = make_jobset(session)
            jobset.check_reproducibility = True
            builds = make_builds(session, drvs, jobset=jobset)
        ids = {job: b.id for job, b in builds.items()}
        try:
            wait_until(lambda: _rows(committed_db, [ids["random"]])[ids["random"]]["status"]
                       == BuildStatus.non_deterministic, timeout=60, interval=0.2,
                       message="the random build found non-deterministic")
        finally:
            print(daemon.log()[-4000:])
    rows = _rows(committed_db, list(ids.values()))
    assert BuildStatus(rows[ids["dependent"]]["status"]) is BuildStatus.succeeded
    assert BuildStatus(rows[ids["stable"]]["status"]) is BuildStatus.succeeded
    assert "output out (" in str(rows[ids["random"]]["error_message"])
