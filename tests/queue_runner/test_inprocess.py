"""Steps and statuses with real Nix and PostgreSQL, dispatcher and worker in-process."""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Callable

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from circus.common.enums import BuildStatus
from circus.common.errors import Conflict, NotFound
from circus.queue_runner.local.worker import KEPT_LOG_NOTE
from circus.queue_runner.service import bump_build, cancel_build, restart_build, set_keep
from circus.queue_runner.steps.logs import compress_file, log_path_for, read_log
from tests.queue_runner.conftest import Driver
from tests.queue_runner.factories import FIXTURES, add_constituents, instantiate, make_builds


def test_dag_statuses(driver: Callable[..., Driver], committed_db: sessionmaker[Session],
                      nix_env: dict[str, str], nonce: str) -> None:
    run = driver()
    drvs = instantiate(["top", "left", "fails", "needsFailing", "withOutput"], nonce, nix_env)
    with committed_db() as session:
        builds = make_builds(session, drvs)
    ids = {job: b.id for job, b in builds.items()}
    statuses = run.run(list(ids.values()))
    assert statuses[ids["top"]] is BuildStatus.succeeded
    assert statuses[ids["left"]] is BuildStatus.succeeded
    assert statuses[ids["fails"]] is BuildStatus.failed
    assert statuses[ids["needsFailing"]] is BuildStatus.dependency_failed
    assert statuses[ids["withOutput"]] is BuildStatus.failed_with_output
    with committed_db() as session:
        steps = session.execute(text("SELECT drv_path, count(*) FROM steps GROUP BY drv_path"
                                     )).all()
        assert all(n == 1 for _, n in steps)



def test_results_logs_and_products(driver: Callable[..., Driver],
                                   committed_db: sessionmaker[Session],
                                   nix_env: dict[str, str], nonce: str) -> None:
    run = driver(queue_runner={"max_log_size": 20000})
    drvs = instantiate(["top", "products", "chatty"], nonce, nix_env)
    with committed_db() as session:
        builds = make_builds(session, drvs)
    ids = {job: b.id for job, b in builds.items()}
    statuses = run.run(list(ids.values()))
    assert statuses[ids["chatty"]] is BuildStatus.log_limit_exceeded
    with committed_db() as session:
        products = session.execute(text(
            "SELECT type, subtype, name, path, sha256, file_size, is_directory, default_path "
            "FROM build_products WHERE build_id = :id ORDER BY type"),
            {"id": ids["products"]}).all()
        metrics = dict(session.execute(text(
            "SELECT name, value FROM build_metrics WHERE build_id = :id"),
            {"id": ids["products"]}).tuples().all())
        logs = dict(session.execute(text("""
            SELECT b.job_name, s.log_path FROM builds b JOIN build_steps bs ON bs.build_id = b.id
            JOIN steps s ON s.id = bs.step_id WHERE bs.is_toplevel""")).tuples().all())
        sizes = dict(session.execute(text(
            "SELECT job_name, log_size FROM builds b JOIN steps s ON s.drv_path = b.drv_path"
        )).tuples().all())
    assert [(p.type, p.subtype) for p in products] == [("doc", "manual"),
                                                       ("file", "binary-dist")]
    doc, hello = products
    assert doc.is_directory
    assert doc.default_path == "index.html"
    assert doc.sha256 is None
    assert hello.name == "hello.txt"
    assert hello.file_size == len("hello product\n")
    assert hello.sha256 == hashlib.sha256(b"hello product\n").hexdigest()
    assert metrics == {"runtime": 1.5, "coverage": 87.0}
    assert logs["top"].endswith(".log.zst")
    assert b"building top" in read_log(logs["top"])
    chatty_log = read_log(logs["chatty"])
    assert len(chatty_log) < 20000 + 1000
    assert b"killed after writing more than 20000 bytes" in chatty_log
    assert 0 < sizes["chatty"] <= 20000


def test_aggregates_finish_with_their_constituents(driver: Callable[..., Driver],
                                                   committed_db: sessionmaker[Session],
                                                   nix_env: dict[str, str], nonce: str) -> None:
    run = driver()
    good = instantiate(["aggregate", "constituentA", "base"], nonce, nix_env)
    bad = instantiate(["aggregate", "constituentA", "constituentB"], nonce + "b", nix_env)
    with committed_db() as session:
        ok = make_builds(session, good)
        add_constituents(session, ok["aggregate"], [ok["constituentA"], ok["base"]])
        ko = make_builds(session, bad)
        add_constituents(session, ko["aggregate"], [ko["constituentA"], ko["constituentB"]])
    ids = [b.id for b in [*ok.values(), *ko.values()]]
    statuses = run.run(ids)
    assert statuses[ok["aggregate"].id] is BuildStatus.succeeded
    assert statuses[ko["aggregate"].id] is BuildStatus.dependency_failed
    with committed_db() as session:
        message = session.execute(text("SELECT error_message FROM builds WHERE id = :id"),
                                  {"id": ko["aggregate"].id}).scalar_one()
    assert "constituentB" in message


def test_cached_failure_and_restart(driver: Callable[..., Driver],
                                    committed_db: sessionmaker[Session],
                                    nix_env: dict[str, str], nonce: str) -> None:
    run = driver()
    drvs = instantiate(["fails", "needsFailing"], nonce, nix_env)
    with committed_db() as session:
        first = make_builds(session, drvs)
    run.run([b.id for b in first.values()])
    with committed_db() as session:
        again = make_builds(session, drvs)
    statuses = run.run([b.id for b in again.values()])
    assert statuses[again["fails"].id] is BuildStatus.cached_failure
    assert statuses[again["needsFailing"].id] is BuildStatus.dependency_failed
    with committed_db() as session:
        runs = session.execute(text(
            "SELECT count(*) FROM steps WHERE drv_path = :d AND started_at IS NOT NULL"),
            {"d": drvs["fails"]}).scalar_one()
        assert runs == 1  # the cached failure did not build again
        restarted = restart_build(session, again["fails"].id)
        session.commit()
        assert restarted.status is BuildStatus.pending
        cached = session.execute(text("SELECT count(*) FROM failed_paths WHERE drv_path = :d"),
                                 {"d": drvs["fails"]}).scalar_one()
        assert cached == 0
        # its dependency_failed dependent came back too
        assert session.execute(text("SELECT status FROM builds WHERE id = :id"),
                               {"id": again["needsFailing"].id}).scalar_one() == 0
    statuses = run.run([b.id for b in again.values()])
    assert statuses[again["fails"].id] is BuildStatus.failed
    with committed_db() as session:
        runs = session.execute(text(
            "SELECT count(*) FROM steps WHERE drv_path = :d AND started_at IS NOT NULL"),
            {"d": drvs["fails"]}).scalar_one()
        assert runs == 2
        steps = session.execute(text(
            "SELECT step_nr FROM build_steps WHERE build_id = :id ORDER BY step_nr"),
            {"id": again["fails"].id}).scalars().all()
        assert steps == [1, 2]  # history kept across the restart


def test_bump_keep_and_cancel_pending(driver: Callable[..., Driver],
                                      committed_db: sessionmaker[Session],
                                      nix_env: dict[str, str], nonce: str) -> None:
    run = driver()
    drvs = instantiate(["top", "left", "base"], nonce, nix_env)
    with committed_db() as session:
        builds = make_builds(session, drvs)
    run.step()
    with committed_db() as session:
        bumped = bump_build(session, builds["left"].id)
        session.commit()
        assert bumped.priority >= 1
        step_priorities = session.execute(text("""
            SELECT s.drv_path, s.priority FROM steps s JOIN build_steps bs ON bs.step_id = s.id
            WHERE bs.build_id = :id"""), {"id": builds["left"].id}).all()
        assert all(p == bumped.priority for _, p in step_priorities)
        cancelled = cancel_build(session, builds["top"].id, reason="not needed")
        session.commit()
        assert cancelled.status is BuildStatus.cancelled
        # top's own step is cancelled; left and base are still needed by other builds
        states = dict(session.execute(text("SELECT drv_path, state FROM steps")).tuples().all())
        assert states[drvs["top"]] == "done"
        assert states[drvs["left"]] != "done"
        with pytest.raises(Conflict):
            cancel_build(session, builds["top"].id)
        with pytest.raises(NotFound):
            bump_build(session, 10**9)
        kept = set_keep(session, builds["base"].id, True)
        session.commit()
        assert kept.keep
    statuses = run.run([builds["left"].id, builds["base"].id])
    assert set(statuses.values()) == {BuildStatus.succeeded}
    with committed_db() as session:
        with pytest.raises(Conflict):
            bump_build(session, builds["left"].id)
        with pytest.raises(Conflict):
            cancel_build(session, builds["left"].id)
        with pytest.raises(NotFound):
            restart_build(session, 10**9)


def test_the_report_of_a_batch_claims_the_next_one(driver: Callable[..., Driver],
                                                   committed_db: sessionmaker[Session],
                                                   nix_env: dict[str, str], nonce: str) -> None:
    # a chain of six in batches of two: the transaction reporting a batch's last step
    # claims the next batch (whose head that report queued), so the slot claims on its
    # own only for the first batch and to find the class empty
    run = driver(queue_runner={"batch_size_alone": 2})
    jobs = [f"c0_{i}" for i in range(6)]
    drvs = instantiate(jobs, nonce, nix_env, expr=FIXTURES / "dag.nix",
                       args={"chains": 1, "length": 6, "fans": 0})
    with committed_db() as session:
        builds = make_builds(session, drvs)
    statuses = run.run([b.id for b in builds.values()])
    assert set(statuses.values()) == {BuildStatus.succeeded}
    assert run.builder.stats["batches"] == 3
    assert run.builder.stats["claims"] == 2


def test_a_step_built_while_no_attempt_followed_it_gets_the_log_nix_kept(
        driver: Callable[..., Driver], committed_db: sessionmaker[Session],
        nix_env: dict[str, str], nonce: str) -> None:
    """``kill -9`` of the queue runner: its ``nix-store`` may still register a build's
    outputs while the lines of that build die in the pipe with the reader (found by
    tests/faults: a succeeded build without a log). Here Nix builds the steps outside
    any worker; the next attempt finds the outputs valid and builds nothing: each step
    still ends with the log of the build that made its outputs, once."""
    run = driver()
    drvs = instantiate(["base", "left", "right"], nonce, nix_env)
    with committed_db() as session:
        builds = make_builds(session, drvs)
    run.step()
    with committed_db() as session:
        step_ids = dict(session.execute(text("SELECT drv_path, id FROM steps WHERE "
                                             "drv_path = ANY(:d)"),
                                        {"d": list(drvs.values())}).tuples().all())
    log_dir = run.settings.logs.log_dir
    paths = {job: log_path_for(log_dir, drv, step_ids[drv]) for job, drv in drvs.items()}
    # left: the dead attempt's plain log has the first line only; right: the dead
    # attempt's whole log, finalized (its outcome was never recorded)
    paths["left"].parent.mkdir(parents=True, exist_ok=True)
    paths["left"].write_bytes(b"[a line the dead attempt wrote]\n")
    paths["right"].parent.mkdir(parents=True, exist_ok=True)
    paths["right"].write_bytes(b"building right\n")
    compress_file(paths["right"])
    subprocess.run(["nix-store", "--realise", drvs["left"], drvs["right"]], env=nix_env,
                   check=True, capture_output=True)

    statuses = run.run([b.id for b in builds.values()])
    assert set(statuses.values()) == {BuildStatus.succeeded}
    with committed_db() as session:
        logs = dict(session.execute(text("SELECT drv_path, log_path FROM steps "
                                         "WHERE drv_path = ANY(:d)"),
                                    {"d": list(drvs.values())}).tuples().all())
    note = KEPT_LOG_NOTE.encode()
    assert read_log(logs[drvs["base"]]) == note + b"\nbuilding base\n"
    assert read_log(logs[drvs["left"]]) == \
        b"[a line the dead attempt wrote]\n" + note + b"\nbuilding left\n"
    assert read_log(logs[drvs["right"]]) == b"building right\n"
