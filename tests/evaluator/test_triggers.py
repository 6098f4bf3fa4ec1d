"""Scheduled checks, reuse of unchanged builds, trigger modes and concurrency."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, text, update
from sqlalchemy.orm import Session, sessionmaker

from circus.common.config import Settings
from circus.common.enums import (
    BuildStatus,
    EvaluationStatus,
    JobsetState,
    TriggerKind,
    TriggerMode,
)
from circus.common.errors import Conflict, NotFound
from circus.common.models import Build, Evaluation, EvaluationBuild, Jobset
from circus.evaluator import execution, schedule, service
from tests.evaluator.conftest import World, completed
from tests.helpers.gitrepo import GitRepo


def finish_builds(factory: sessionmaker[Session], evaluation_id: int) -> None:
    with factory() as session, session.begin():
        session.execute(update(Build).where(Build.evaluation_id == evaluation_id)
                        .values(status=BuildStatus.succeeded))


def test_an_unchanged_jobset_is_skipped_and_a_new_commit_reuses_builds(
        world: World, flake_repo: GitRepo) -> None:
    jobset_id = world.jobset(flake_repo.url)
    assert world.check(jobset_id) == "evaluated"
    first = world.latest(jobset_id)
    assert first is not None
    assert first.trigger_kind is TriggerKind.source_change
    assert first.requested_by == "scheduler"
    completed(world.run(first.id) and world.evaluation(first.id))

    # nothing changed: no evaluation, the jobset says so
    assert world.check(jobset_id) == "unchanged"
    assert world.count_evaluations(jobset_id) == 1
    assert world.jobset_row(jobset_id).last_check_outcome == "unchanged"

    # change one job: only it gets a new build, the rest link to the old ones
    flake = (flake_repo.path / "flake.nix").read_text()
    flake_repo.commit({"flake.nix": flake.replace('mk "plain" { }', 'mk "plain" { v = 2; }')})
    assert world.check(jobset_id) == "evaluated"
    second = world.latest(jobset_id)
    assert second is not None
    assert second.id != first.id
    world.run(second.id)
    second = completed(world.evaluation(second.id))
    assert second.commit_hash == flake_repo.head()
    # the aggregate "release" names nested.plain: a changed constituent means a new
    # aggregate build (Hydra's aggregate derivation would have changed too)
    assert (second.builds_new, second.builds_reused) == (2, 6)

    old, new = world.builds(first.id), world.builds(second.id)
    assert set(new) == set(old)
    assert new["nested.plain"].id != old["nested.plain"].id
    assert new["nested.plain"].evaluation_id == second.id
    assert new["release"].id != old["release"].id
    for name in set(new) - {"nested.plain", "release"}:
        assert new[name].id == old[name].id
    with world.factory() as session:
        flags = dict(session.execute(select(EvaluationBuild.build_id, EvaluationBuild.is_new)
                                     .where(EvaluationBuild.evaluation_id == second.id)).all())
        comparison = service.compare(session, second.id, first.id)
    assert flags[new["nested.plain"].id] is True
    assert flags[new["hello"].id] is False
    assert comparison.changed_jobs == ["nested.plain"]
    assert comparison.new_jobs == comparison.removed_jobs == []
    assert comparison.unchanged_count == 7


def test_compare_reports_new_and_removed_jobs(world: World, flake_repo: GitRepo) -> None:
    jobset_id = world.jobset(flake_repo.url)
    first = completed(world.evaluate(jobset_id))
    flake = (flake_repo.path / "flake.nix").read_text()
    flake_repo.commit({"flake.nix": flake.replace("usesHello =", "renamed =")})
    second = completed(world.evaluate(jobset_id))
    with world.factory() as session:
        comparison = service.compare(session, second.id, first.id)
        with pytest.raises(NotFound):
            service.compare(session, second.id, 10**9)
    assert comparison.new_jobs == ["renamed"]
    assert comparison.removed_jobs == ["usesHello"]
    assert comparison.changed_jobs == []
    assert comparison.unchanged_count == 7


def test_interval_mode_evaluates_every_time_once_builds_finished(
        world: World, flake_repo: GitRepo) -> None:
    jobset_id = world.jobset(flake_repo.url, trigger_mode=TriggerMode.interval)
    assert world.check(jobset_id) == "evaluated"
    first = world.latest(jobset_id)
    assert first is not None
    assert first.trigger_kind is TriggerKind.interval
    world.run(first.id)
    # builds still pending: wait for them
    assert world.check(jobset_id) == "busy"
    assert world.jobset_row(jobset_id).last_check_outcome == "busy"
    finish_builds(world.factory, first.id)
    assert world.check(jobset_id) == "evaluated"
    second = world.latest(jobset_id)
    assert second is not None
    world.run(second.id)
    second = completed(world.evaluation(second.id))
    assert second.commit_hash == world.evaluation(first.id).commit_hash == flake_repo.head()
    # same derivations, yet fresh builds: interval mode never reuses
    assert (second.builds_new, second.builds_reused) == (8, 0)
    old, new = world.builds(first.id), world.builds(second.id)
    assert {b.drv_path for b in old.values()} == {b.drv_path for b in new.values()}
    assert not {b.id for b in old.values()} & {b.id for b in new.values()}


def test_one_shot_disables_itself_and_one_at_a_time_waits(world: World,
                                                         flake_repo: GitRepo) -> None:
    one_shot = world.jobset(flake_repo.url, state=JobsetState.one_shot)
    completed(world.evaluate(one_shot))
    assert world.jobset_row(one_shot).state is JobsetState.disabled
    assert world.check(one_shot) == "disabled"
    with world.factory() as session, pytest.raises(Conflict):
        service.trigger(session, one_shot, TriggerKind.manual)

    waiting = world.jobset(flake_repo.url, state=JobsetState.one_at_a_time)
    first = completed(world.evaluate(waiting))
    flake = (flake_repo.path / "flake.nix").read_text()
    flake_repo.commit({"flake.nix": flake.replace("Says hello", "Says hi")})
    assert world.check(waiting) == "busy"
    finish_builds(world.factory, first.id)
    assert world.check(waiting) == "evaluated"


def test_two_concurrent_triggers_make_one_evaluation(world: World, flake_repo: GitRepo
                                                     ) -> None:
    jobset_id = world.jobset(flake_repo.url)
    barrier = threading.Barrier(2)
    results: list[tuple[int, bool]] = []
    lock = threading.Lock()

    def run() -> None:
        with world.factory() as session:
            barrier.wait()
            evaluation, created = service.trigger(session, jobset_id, TriggerKind.manual)
            # hold the transaction open so the other trigger collides with it
            threading.Event().wait(0.3)
            session.commit()
            with lock:
                results.append((evaluation.id, created))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(results) == 2
    assert results[0][0] == results[1][0]
    assert sorted(created for _, created in results) == [False, True]
    assert world.count_evaluations(jobset_id) == 1


def test_one_evaluation_per_jobset_runs_at_a_time(world: World, flake_repo: GitRepo,
                                                  engine: object) -> None:
    jobset_id = world.jobset(flake_repo.url)
    evaluation_id = world.trigger(jobset_id)
    # someone else holds the jobset's evaluation lock
    holder = execution.JobsetLock(world.factory.kw["bind"], jobset_id)
    assert holder.acquire()
    try:
        assert world.run(evaluation_id).status == "busy"
        assert world.evaluation(evaluation_id).status is EvaluationStatus.pending
    finally:
        holder.release()
    completed(world.run(evaluation_id) and world.evaluation(evaluation_id))


def test_max_concurrent_evals_defers_and_the_tick_republishes(
        world: World, flake_repo: GitRepo, make_settings: object) -> None:
    first = world.jobset(flake_repo.url)
    second = world.jobset(flake_repo.url)
    running = world.trigger(first)
    with world.factory() as session, session.begin():
        session.execute(update(Evaluation).where(Evaluation.id == running)
                        .values(status=EvaluationStatus.running))
        # checked a moment ago: only the reaping makes it due again
        session.execute(update(Jobset).where(Jobset.id == first)
                        .values(last_checked_at=datetime.now(UTC)))
    waiting = world.trigger(second)
    settings = world.settings.model_copy(update={
        "evaluator": world.settings.evaluator.model_copy(update={"max_concurrent_evals": 1})})
    assert world.run(waiting, settings).status == "deferred"
    assert world.evaluation(waiting).status is EvaluationStatus.pending
    with world.factory() as session, session.begin():
        session.execute(update(Evaluation).where(Evaluation.id == waiting).values(
            created_at=datetime.now(UTC) - timedelta(minutes=5)))
        report = schedule.tick(session, settings)
    # the "running" one has no live worker: reaped; the waiting one is re-sent
    assert report.reaped == [running]
    assert report.checks == [first]   # evaluated again at once, not a check_interval later
    assert report.republished == [waiting]
    assert world.evaluation(running).status is EvaluationStatus.failed
    assert "stopped" in (world.evaluation(running).error_message or "")
    completed(world.run(waiting, settings) and world.evaluation(waiting))


def test_the_tick_picks_due_jobsets_only(world: World, flake_repo: GitRepo) -> None:
    due = world.jobset(flake_repo.url)
    recent = world.jobset(flake_repo.url, check_interval=3600)
    disabled = world.jobset(flake_repo.url, state=JobsetState.disabled)
    manual_only = world.jobset(flake_repo.url, check_interval=0)
    with world.factory() as session, session.begin():
        session.execute(update(Jobset).where(Jobset.id == recent)
                        .values(last_checked_at=datetime.now(UTC)))
        session.execute(update(Jobset).where(Jobset.id == due).values(
            last_checked_at=datetime.now(UTC) - timedelta(seconds=61)))
        report = schedule.tick(session, world.settings)
    assert report.checks == [due]
    assert disabled not in report.checks
    assert manual_only not in report.checks
    with world.factory() as session, session.begin():
        # checked just now: not due again
        assert schedule.tick(session, world.settings).checks == []


def test_cancelling_a_pending_evaluation_and_the_builds_of_a_finished_one(
        world: World, flake_repo: GitRepo) -> None:
    jobset_id = world.jobset(flake_repo.url)
    pending = world.trigger(jobset_id)
    with world.factory() as session, session.begin():
        cancelled = service.cancel_evaluation(session, pending)
        assert cancelled.status is EvaluationStatus.cancelled
    assert world.run(pending).status == "skipped"

    done = completed(world.evaluate(jobset_id))
    with world.factory() as session, session.begin():
        after = service.cancel_evaluation(session, done.id)
        assert after.status is EvaluationStatus.completed
        with pytest.raises(Conflict):
            service.cancel_evaluation(session, pending)
        with pytest.raises(NotFound):
            service.cancel_evaluation(session, 10**9)
    statuses = {b.status for b in world.builds(done.id).values()}
    assert statuses == {BuildStatus.cancelled}
    # cancelled builds are not reused: the next evaluation queues them again
    again = completed(world.evaluate(jobset_id))
    assert (again.builds_new, again.builds_reused) == (8, 0)


def test_cancelling_a_running_evaluation_stops_nix(
        world: World, git_repo: object, tmp_path: Path, settings: Settings) -> None:
    import os

    from circus.common.enums import InputType

    fifo = tmp_path / "blocked"
    os.mkfifo(fifo)
    repo = git_repo("hang")  # type: ignore[operator]
    repo.commit({"release.nix": "{ path }: { x = builtins.readFile path; }"})
    jobset_id = world.jobset(repo.url, flake=False, expression="release.nix",
                             inputs=[("path", InputType.string, str(fifo))])
    evaluation_id = world.trigger(jobset_id)
    outcome: list[execution.Outcome] = []
    runner = threading.Thread(target=lambda: outcome.append(world.run(evaluation_id)))
    runner.start()
    deadline = datetime.now(UTC) + timedelta(seconds=30)
    while world.evaluation(evaluation_id).status is EvaluationStatus.pending:
        assert datetime.now(UTC) < deadline
        threading.Event().wait(0.1)
    with world.factory() as session, session.begin():
        service.cancel_evaluation(session, evaluation_id)
    runner.join(30)
    assert outcome
    assert outcome[0].status == "cancelled"
    assert world.evaluation(evaluation_id).status is EvaluationStatus.cancelled


def test_unknown_and_disabled_jobsets_cannot_be_triggered(world: World,
                                                          flake_repo: GitRepo) -> None:
    disabled = world.jobset(flake_repo.url, state=JobsetState.disabled)
    with world.factory() as session:
        with pytest.raises(NotFound):
            service.trigger(session, 10**9, TriggerKind.manual)
        with pytest.raises(Conflict):
            service.trigger(session, disabled, TriggerKind.webhook)


def test_pull_request_evaluations_use_the_head_branch(world: World, flake_repo: GitRepo
                                                      ) -> None:
    base = flake_repo.head()
    flake_repo.git("checkout", "-q", "-b", "feature")
    flake = (flake_repo.path / "flake.nix").read_text()
    head = flake_repo.commit({"flake.nix": flake.replace("Says hello", "Says hey")})
    flake_repo.git("checkout", "-q", "main")
    jobset_id = world.jobset(flake_repo.url)
    main_eval = completed(world.evaluate(jobset_id))
    assert main_eval.commit_hash == base
    with world.factory() as session, session.begin():
        evaluation, created = service.trigger(
            session, jobset_id, TriggerKind.webhook,
            pull_request=service.PullRequest(7, "feature", "main", "opened", head_sha=head))
    assert created
    world.run(evaluation.id)
    pr = completed(world.evaluation(evaluation.id))
    assert pr.commit_hash == head
    assert (pr.pr_number, pr.pr_head_branch, pr.pr_base_branch) == (7, "feature", "main")
    # meta changed, derivations did not: everything is reused from the branch
    assert pr.builds_reused == 8
    with world.factory() as session:
        assert session.execute(text("SELECT count(*) FROM builds")).scalar() == 8


def test_drv_roots_live_until_the_builds_are_done(world: World, flake_repo: GitRepo) -> None:
    evaluation = completed(world.evaluate(world.jobset(flake_repo.url)))
    roots = execution.gc_roots_dir(world.settings, evaluation.id)
    assert (roots / "roots").is_symlink()
    with world.factory() as session:
        assert schedule.prune_gc_roots(session, world.settings) == []
    assert roots.exists()
    finish_builds(world.factory, evaluation.id)
    with world.factory() as session:
        assert schedule.prune_gc_roots(session, world.settings) == [evaluation.id]
    assert not roots.exists()


def test_reused_builds_report_their_status_to_the_new_commit(
        world: World, flake_repo: GitRepo) -> None:
    from circus.common.enums import NotificationType
    from circus.common.models import NotificationConfig, NotificationTask
    from circus.notifications import service as notifications

    notified = world.jobset(flake_repo.url)
    quiet = world.jobset(flake_repo.url)
    with world.factory() as session, session.begin():
        project_id = session.get_one(Jobset, notified).project_id
        session.add(NotificationConfig(project_id=project_id,
                                       type=NotificationType.webhook,
                                       config={"url": "http://127.0.0.1:9/hook"}))
    firsts = [world.evaluate(j) for j in (notified, quiet)]
    for first in firsts:
        finish_builds(world.factory, first.id)
    with world.factory() as session, session.begin():
        notifications.collect_events(session, world.settings)  # the first round's events
        session.execute(text("DELETE FROM notification_tasks"))

    flake = (flake_repo.path / "flake.nix").read_text()
    flake_repo.commit({"flake.nix": flake.replace('mk "plain" { }', 'mk "plain" { v = 2; }')})
    seconds = [world.evaluate(j) for j in (notified, quiet)]
    # nested.plain changed, and with it the aggregate naming it
    assert [s.builds_reused for s in seconds] == [6, 6]
    with world.factory() as session, session.begin():
        stamped = dict(session.execute(text(
            "SELECT jobset_id, count(*) FROM builds WHERE notification_pending_since "
            "IS NOT NULL AND status = :ok GROUP BY jobset_id"),
            {"ok": int(BuildStatus.succeeded)}).tuples().all())
        # only the project with notifications pays for the stamps
        assert stamped == {notified: 6}
        notifications.collect_events(session, world.settings)
        tasks = list(session.scalars(select(NotificationTask)))
    new_commit = [t.payload for t in tasks if t.payload["commit"] == flake_repo.head()]
    # the six unchanged jobs report "succeeded" on the new commit, as part of the new
    # evaluation (the changed jobs' own events come from the queue runner later)
    assert sorted(p["build"]["status"] for p in new_commit) == ["succeeded"] * 6
    assert {p["evaluation_id"] for p in new_commit} == {seconds[0].id}
    assert {p["build"]["job_name"] for p in new_commit} == \
        set(world.builds(seconds[0].id)) - {"nested.plain", "release"}
