"""The builds' rollups behind ``/builds/stats`` and the time series: right after every
change of the builds (the triggers of migration b7d2e4f1a9c3), merged or not, and
never a lock that finishing builds wait for."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import Engine, delete, event, func, select, text
from sqlalchemy.orm import Session, sessionmaker

from circus.common import rollups
from circus.common.config import Settings
from circus.common.enums import BuildStatus, EvaluationStatus, Role
from circus.common.models import (
    Build,
    BuildCompletionHour,
    BuildIdBlock,
    BuildStatusTotal,
    EvaluationTotal,
    ProjectCompletionHour,
)
from circus.common.models.base import utcnow
from circus.projects import service as projects
from circus.queue_runner.builds.results import BuildFinal, finish_builds
from circus.queue_runner.service import restart_build
from tests.api.conftest import SYSTEM, World, make_app


@pytest.fixture
def app(make_settings: Callable[..., Settings], engine: Engine, db: Session) -> Flask:
    # no per-process cache: every request reads the rollups
    return make_app(make_settings(server={"aggregate_cache_seconds": 0,
                                          "rate_limit_api": "100000/minute"}), engine, db)


def stats(client: FlaskClient, headers: dict[str, str], **args: int) -> dict[str, Any]:
    query = "&".join(f"{k}={v}" for k, v in args.items())
    response = client.get(f"/api/v1/builds/stats?{query}", headers=headers)
    assert response.status_code == 200
    return response.get_json()  # type: ignore[no-any-return]


def series(client: FlaskClient, headers: dict[str, str], kind: str, query: str = ""
           ) -> list[dict[str, Any]]:
    response = client.get(f"/api/v1/metrics/timeseries/{kind}?{query}", headers=headers)
    assert response.status_code == 200
    return [point["values"] for point in response.get_json()["series"]]


def test_figures_follow_builds_finishing_failing_restarting_and_deleted(
        client: FlaskClient, admin: dict[str, str], world: World, db: Session) -> None:
    project = world.project()
    jobset, other = world.jobset(project), world.jobset(project, "other")
    evaluation = world.evaluation(jobset)
    a, b, c = (world.build(evaluation, job) for job in "abc")
    world.build(world.evaluation(other), "d")
    assert stats(client, admin)["by_status"] == {"pending": 4}
    assert series(client, admin, "builds") == []

    started = utcnow() - timedelta(seconds=90)
    finish_builds(db, None, [BuildFinal(a.id, BuildStatus.failed, started_at=started),
                             BuildFinal(b.id, BuildStatus.timeout, started_at=started)])
    db.execute(text("UPDATE builds SET status = 1, started_at = now() WHERE id = :id"),
               {"id": c.id})
    figures = stats(client, admin, jobset_id=jobset.id)
    assert figures["by_status"] == {"failed": 1, "timeout": 1, "running": 1}
    assert (figures["finished"], figures["failed"], figures["running"]) == (2, 2, 1)
    assert figures["avg_duration_seconds"] == pytest.approx(90, abs=5)
    assert stats(client, admin)["total"] == 4
    [system] = client.get("/api/v1/metrics/systems", headers=admin).get_json()["systems"]
    assert (system["pending"], system["running"], system["failed"]) == (1, 1, 2)
    assert series(client, admin, "builds", "days=1") == [{"failed": 1.0, "timeout": 1.0}]
    assert series(client, admin, "builds", f"jobset_id={jobset.id}") == [
        {"failed": 1.0, "timeout": 1.0}]
    assert series(client, admin, "builds", f"jobset_id={other.id}") == []
    assert series(client, admin, "builds", f"project_id={project.id}&bucket=week") == [
        {"failed": 1.0, "timeout": 1.0}]
    [duration] = series(client, admin, "duration", "bucket=hour")
    assert duration["avg_seconds"] == pytest.approx(90, abs=5)

    restart_build(db, a.id)
    assert stats(client, admin, jobset_id=jobset.id)["by_status"] == {
        "pending": 1, "timeout": 1, "running": 1}
    assert series(client, admin, "builds") == [{"timeout": 1.0}]

    # merged, the same figures from one row per key
    before = stats(client, admin)
    assert rollups.compact(db) > 0
    assert stats(client, admin) == before
    assert series(client, admin, "builds") == [{"timeout": 1.0}]
    assert db.scalar(select(func.count()).select_from(BuildStatusTotal).where(
        BuildStatusTotal.merged.is_(False))) == 0
    assert all(count == 1 for count in db.scalars(
        select(func.count()).select_from(BuildStatusTotal)
        .group_by(BuildStatusTotal.jobset_id, BuildStatusTotal.status)))

    # deleting a jobset deletes its builds (a foreign key's cascade): their counts go too
    projects.delete_jobset(db, SYSTEM, jobset)
    db.flush()
    assert stats(client, admin)["by_status"] == {"pending": 1}
    assert series(client, admin, "builds") == []
    assert series(client, admin, "builds", f"project_id={project.id}") == []
    rollups.compact(db)
    assert db.scalar(select(func.count()).select_from(BuildCompletionHour)) == 0
    assert db.scalar(select(func.count()).select_from(ProjectCompletionHour)) == 0
    assert db.scalar(select(func.sum(BuildStatusTotal.builds))) == 1


def test_deleting_a_project_deletes_its_builds_and_their_counts(
        client: FlaskClient, admin: dict[str, str], world: World, db: Session) -> None:
    """builds.project_id has no foreign key (migration c4e8a1f6d2b9): the project's
    builds go through its jobsets' evaluations."""
    doomed, kept = world.project("doomed"), world.project("kept")
    for project in (doomed, kept):
        jobset = world.jobset(project)
        evaluation = world.evaluation(jobset)
        world.build(evaluation, "a")
        world.build(evaluation, "b", status=BuildStatus.succeeded)
    projects.delete_project(db, SYSTEM, doomed)
    db.flush()
    assert set(db.scalars(select(Build.project_id))) == {kept.id}
    assert stats(client, admin)["by_status"] == {"pending": 1, "succeeded": 1}


def test_series_start_exactly_days_ago_inside_an_hour(
        client: FlaskClient, admin: dict[str, str], world: World) -> None:
    """Whole hours come from the rollup, the part of the first hour from the builds:
    a build finished a minute before ``days`` ago is left out, one a minute after is
    counted, wherever the hour boundary falls."""
    evaluation = world.evaluation(world.jobset(world.project()))
    day_ago = utcnow() - timedelta(days=1)
    for job, completed in (("early", day_ago - timedelta(minutes=1)),
                           ("late", day_ago + timedelta(minutes=1)),
                           ("recent", utcnow() - timedelta(minutes=1))):
        world.build(evaluation, job, BuildStatus.succeeded, completed_at=completed,
                    started_at=completed - timedelta(seconds=10))
    points = series(client, admin, "builds", "days=1&bucket=week")
    assert sum(p.get("succeeded", 0) for p in points) == 2
    points = series(client, admin, "builds", "days=2&bucket=week")
    assert sum(p.get("succeeded", 0) for p in points) == 3


def test_stats_leave_out_hidden_projects(client: FlaskClient, keys: Any, world: World) -> None:
    shown, hidden = world.project("shown"), world.project("secret", hidden=True)
    world.build(world.evaluation(world.jobset(shown)), "a", BuildStatus.succeeded)
    world.build(world.evaluation(world.jobset(hidden)), "b", BuildStatus.failed)
    reader = keys.headers(Role.read_only)
    assert stats(client, reader)["by_status"] == {"succeeded": 1}
    assert stats(client, keys.headers(name="admin2"))["total"] == 2


def test_finishing_builds_of_one_jobset_do_not_wait_for_each_other(
        committed_db: sessionmaker[Session]) -> None:
    """Each statement appends its own delta rows: two open transactions finishing
    builds of the same jobset, status and hour do not lock a shared counter row."""
    with committed_db() as setup:
        world = World(setup)
        evaluation = world.evaluation(world.jobset(world.project()))
        first, second = world.build(evaluation, "a"), world.build(evaluation, "b")
        setup.commit()
    with committed_db() as one, committed_db() as two:
        finish_builds(one, None, [BuildFinal(first.id, BuildStatus.failed)])
        two.execute(text("SET LOCAL lock_timeout = '2s'"))
        finish_builds(two, None, [BuildFinal(second.id, BuildStatus.failed)])
        two.commit()
        one.commit()
    with committed_db() as check:
        assert check.scalar(select(func.sum(BuildStatusTotal.builds)).where(
            BuildStatusTotal.status == BuildStatus.failed)) == 2
        assert check.scalar(select(func.sum(BuildStatusTotal.builds)).where(
            BuildStatusTotal.status == BuildStatus.pending)) == 0
        assert check.scalar(select(func.count()).select_from(Build)) == 2


def test_rebuild_gives_what_the_triggers_wrote(client: FlaskClient, admin: dict[str, str],
                                               world: World, db: Session) -> None:
    """For rows loaded with the triggers off (bench/api_scale.py's generator)."""
    evaluation = world.evaluation(world.jobset(world.project()))
    now = utcnow()
    for job, status in (("a", BuildStatus.succeeded), ("b", BuildStatus.failed)):
        world.build(evaluation, job, status, started_at=now - timedelta(minutes=3),
                    completed_at=now - timedelta(minutes=1))
    world.build(evaluation, "c")
    blocks = select(BuildIdBlock.project_id, BuildIdBlock.block,
                    func.sum(BuildIdBlock.builds)).group_by(BuildIdBlock.project_id,
                                                            BuildIdBlock.block)
    evaluations = select(EvaluationTotal.jobset_id, EvaluationTotal.status,
                         func.sum(EvaluationTotal.evaluations)).group_by(
        EvaluationTotal.jobset_id, EvaluationTotal.status)
    figures = (stats(client, admin), series(client, admin, "duration", "bucket=hour"),
               db.execute(blocks).all(), db.execute(evaluations).all())
    rollups.rebuild(db)
    assert db.scalar(select(func.count()).select_from(BuildStatusTotal).where(
        BuildStatusTotal.merged.is_(False))) == 0
    assert (stats(client, admin), series(client, admin, "duration", "bucket=hour"),
            db.execute(blocks).all(), db.execute(evaluations).all()) == figures


def test_truncating_builds_empties_the_figures(client: FlaskClient, admin: dict[str, str],
                                               world: World, db: Session) -> None:
    """TRUNCATE fires no delete trigger; cascaded from projects it empties builds too."""
    evaluation = world.evaluation(world.jobset(world.project()))
    now = utcnow()
    world.build(evaluation, "a", BuildStatus.succeeded, started_at=now - timedelta(minutes=3),
                completed_at=now - timedelta(minutes=1))
    world.build(evaluation, "b")
    assert stats(client, admin)["total"] == 2
    assert sum(p.get("succeeded", 0) for p in series(client, admin, "builds", "days=1")) == 1
    db.execute(text("TRUNCATE projects CASCADE"))
    assert stats(client, admin)["total"] == 0
    assert sum(p.get("succeeded", 0) for p in series(client, admin, "builds", "days=1")) == 0
    for model in (BuildStatusTotal, BuildCompletionHour, ProjectCompletionHour, BuildIdBlock,
                  EvaluationTotal):
        assert db.scalar(select(func.count()).select_from(model)) == 0, model


def test_a_merge_leaves_deltas_it_cannot_see_for_the_next(
        committed_db: sessionmaker[Session]) -> None:
    """A build finishing in a transaction still open while another merges: its delta is
    neither lost nor counted twice, and the next merge takes it."""
    with committed_db() as setup:
        world = World(setup)
        evaluation = world.evaluation(world.jobset(world.project()))
        first, second = world.build(evaluation, "a"), world.build(evaluation, "b")
        setup.commit()

    def totals(session: Session) -> dict[BuildStatus, int]:
        return {status: int(count) for status, count in session.execute(
            select(BuildStatusTotal.status, func.sum(BuildStatusTotal.builds))
            .group_by(BuildStatusTotal.status)) if count}

    with committed_db() as finishing, committed_db() as merging:
        finish_builds(finishing, None, [BuildFinal(first.id, BuildStatus.failed)])
        assert rollups.compact(merging) > 0  # the inserts' deltas, not the open finish
        merging.commit()
        finishing.commit()
    with committed_db() as check:
        assert totals(check) == {BuildStatus.pending: 1, BuildStatus.failed: 1}
        rollups.compact(check)
        check.commit()
        assert totals(check) == {BuildStatus.pending: 1, BuildStatus.failed: 1}
        assert check.scalar(select(func.count()).select_from(BuildStatusTotal).where(
            BuildStatusTotal.merged.is_(False))) == 0
        assert check.get(Build, second.id) is not None


def test_deep_offsets_found_through_id_blocks_give_the_walks_pages(
        client: FlaskClient, admin: dict[str, str], keys: Any, world: World, db: Session,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Deep offsets (DEFERRED_OFFSET lowered here) of all builds or a project's find
    their block of ids in build_id_blocks: the pages plain offsets give, without the
    hidden project's builds, after a delete and a merge too."""
    from circus.server.api import base

    shown, hidden = world.project(), world.project("secret", hidden=True)
    evaluations = world.evaluation(world.jobset(shown)), world.evaluation(world.jobset(hidden))
    for n, build_id in enumerate((3, 4, 10_001, 10_002, 10_003, 29_999, 30_000, 45_000)):
        world.build(evaluations[n % 3 == 0], f"job{n}", id=build_id)
    reader = keys.headers(Role.read_only)
    lists = ((admin, ""), (reader, ""), (admin, f"&project_id={shown.id}"))
    seen: list[str] = []

    def pages() -> list[list[list[int]]]:
        return [[[b["id"] for b in client.get(f"/api/v1/builds?limit=2&offset={offset}{query}",
                                              headers=headers).get_json()["items"]]
                 for offset in range(10)] for headers, query in lists]

    def found_through_blocks() -> list[list[list[int]]]:
        monkeypatch.setattr(base, "DEFERRED_OFFSET", -1)
        seen.clear()
        found = pages()
        monkeypatch.setattr(base, "DEFERRED_OFFSET", 1000)
        assert sum("build_id_blocks" in statement for statement in seen) == 10 * len(lists)
        return found

    event.listen(db.get_bind(), "before_cursor_execute", lambda *args: seen.append(args[2]))
    walked = pages()
    assert walked[0][:3] == [[45_000, 30_000], [30_000, 29_999], [29_999, 10_003]]
    assert walked[1][0] == [45_000, 29_999]  # 30,000, 10,002 and 3 are the hidden project's
    assert found_through_blocks() == walked
    db.execute(delete(Build).where(Build.id.in_([10_001, 4])))
    walked = pages()
    assert found_through_blocks() == walked
    assert rollups.compact(db) > 0
    # a row per project and block left (the first block's last shown build is gone)
    assert db.scalar(select(func.count()).select_from(BuildIdBlock)) == 6
    assert found_through_blocks() == walked


def test_evaluation_totals_follow_evaluations_and_leave_out_hidden_projects(
        client: FlaskClient, admin: dict[str, str], keys: Any, world: World, db: Session
        ) -> None:
    """The total of every list of evaluations comes from evaluation_totals: right after
    inserts, status changes and deletes, merged or not, without hidden projects for
    those who may not see them."""
    shown, hidden = world.project(), world.project("secret", hidden=True)
    jobset, other, secret = (world.jobset(shown), world.jobset(shown, "other"),
                             world.jobset(hidden))
    first, _, _ = (world.evaluation(jobset), world.evaluation(other, EvaluationStatus.failed),
                   world.evaluation(secret))
    running = world.evaluation(jobset, EvaluationStatus.running)
    reader = keys.headers(Role.read_only)
    queries = ("", f"jobset_id={jobset.id}", f"project_id={shown.id}", "status=completed",
               "status=failed", "trigger_kind=manual", "trigger_kind=webhook",
               f"project_id={hidden.id}", f"jobset_id={jobset.id}&status=running")

    def totals_are_the_lists_lengths() -> None:
        for headers in (admin, reader):
            for query in queries:
                page = client.get(f"/api/v1/evaluations?limit=1&{query}",
                                  headers=headers).get_json()
                everything = client.get(f"/api/v1/evaluations?limit=500&{query}",
                                        headers=headers).get_json()
                assert (page["total"], page["total_exact"]) == (
                    len(everything["items"]), True), (query, headers is admin)

    totals_are_the_lists_lengths()
    assert client.get("/api/v1/evaluations", headers=reader).get_json()["total"] == 3
    running.status = EvaluationStatus.completed
    db.flush()
    db.execute(text("DELETE FROM evaluations WHERE id = :id"), {"id": first.id})
    totals_are_the_lists_lengths()
    assert client.get("/api/v1/evaluations?status=completed",
                      headers=admin).get_json()["total"] == 2
    assert rollups.compact(db) > 0
    assert db.scalar(select(func.count()).select_from(EvaluationTotal).where(
        EvaluationTotal.merged.is_(False))) == 0
    totals_are_the_lists_lengths()
