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
from sqlalchemy import Engine, func, select, text
from sqlalchemy.orm import Session, sessionmaker

from circus.common import rollups
from circus.common.config import Settings
from circus.common.enums import BuildStatus, Role
from circus.common.models import (
    Build,
    BuildCompletionHour,
    BuildStatusTotal,
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
    figures = stats(client, admin), series(client, admin, "duration", "bucket=hour")
    rollups.rebuild(db)
    assert db.scalar(select(func.count()).select_from(BuildStatusTotal).where(
        BuildStatusTotal.merged.is_(False))) == 0
    assert (stats(client, admin), series(client, admin, "duration", "bucket=hour")) == figures


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
