"""Events → tasks → deliveries: the collector, back-off, supersession, the scan, retention."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from circus.common.config import Settings
from circus.common.enums import BuildStatus, NotificationTaskStatus, NotificationType
from circus.common.messaging import DELIVER_TASK
from circus.common.models import Build, NotificationTask
from circus.common.models.base import utcnow
from circus.notifications import service
from tests.notifications.conftest import BASE_URL, SHA, Queue, Rows
from tests.notifications.stubs import HttpStub

GH = NotificationType.github_status


def tasks_of(db: Session, build: Build) -> list[NotificationTask]:
    return list(db.scalars(select(NotificationTask).where(NotificationTask.build_id == build.id)
                           .order_by(NotificationTask.id)))


def test_collector_makes_one_task_per_wanting_config_and_clears_the_stamp(
        db: Session, rows: Rows, notify_settings: Callable[..., Settings],
        notify_queue: Queue) -> None:
    settings = notify_settings(notifications={"email": {"enabled": True,
                                                        "to": ["dev@example.org"]}})
    project = rows.project()
    evaluation = rows.evaluation(rows.jobset(project))
    github = rows.config(project, GH)
    email = rows.config(project, NotificationType.email, on_failure_only=True)
    rows.config(project, NotificationType.slack, enabled=False, webhook_url="http://x/y")
    only_docs = rows.config(project, NotificationType.webhook, url="http://hooks/x",
                            jobs="docs\\..*")
    queued = rows.build(evaluation, "hello")
    failed = rows.build(evaluation, "docs.manual", status=BuildStatus.failed,
                        error_message="builder failed with exit code 3")
    quiet = rows.build(rows.evaluation(rows.jobset(rows.project("other"))), "x")
    unstamped = rows.build(evaluation, "later", stamped=False)

    result = service.collect_events(db, settings)
    db.commit()

    assert result.builds == 3  # the stamped ones, with or without configs
    made = {(t.build_id, t.config_id) for t in db.scalars(select(NotificationTask))}
    assert made == {(queued.id, github.id), (failed.id, github.id), (failed.id, email.id),
                    (failed.id, only_docs.id)}
    stamps = db.execute(text("SELECT count(*) FROM builds WHERE id = ANY(:ids) AND "
                             "notification_pending_since IS NOT NULL"),
                        {"ids": [queued.id, failed.id, quiet.id, unstamped.id]}).scalar()
    assert stamps == 0
    payload = tasks_of(db, failed)[0].payload
    assert payload["event"] == "finished"
    assert payload["commit"] == SHA
    assert payload["project"] == "widget"
    assert payload["jobset"] == "main"
    assert payload["build"]["url"] == f"{BASE_URL}/build/{failed.id}"
    assert payload["build"]["status"] == "failed"
    assert payload["build"]["error_message"] == "builder failed with exit code 3"
    assert payload["build"]["outputs"]["out"].endswith("-docs.manual")
    assert tasks_of(db, queued)[0].payload["event"] == "queued"
    # every task is delivered right after the commit
    assert sorted(notify_queue.messages()) == sorted(
        (DELIVER_TASK, [task_id, 0]) for task_id in result.task_ids)
    # nothing stamped, nothing to do
    assert service.collect_events(db, settings).builds == 0


def test_github_status_for_each_event(db: Session, rows: Rows, stub: HttpStub,
                                      notify_settings: Callable[..., Settings],
                                      notify_queue: Queue) -> None:
    settings = notify_settings()
    project = rows.project()
    config = rows.config(project, GH)
    build = rows.build(rows.evaluation(rows.jobset(project)), "hello")
    seen: list[tuple[str, str]] = []
    for status in (BuildStatus.pending, BuildStatus.running, BuildStatus.succeeded):
        rows.stamp(build, status)
        (task_id,) = service.collect_events(db, settings).task_ids
        db.commit()
        assert service.deliver(db, settings, task_id, 0) == "completed"
        request = stub.requests[-1]
        assert request.path == f"/github/repos/acme/widget/statuses/{SHA}"
        assert request.headers["authorization"] == "Bearer gh-secret-token"
        body = request.json()
        assert body["context"] == "circus/widget/main/hello"
        assert body["target_url"] == f"{BASE_URL}/build/{build.id}"
        seen.append((body["state"], body["description"]))
    assert seen == [("pending", "queued"), ("pending", "building"),
                    ("success", "build succeeded")]
    task = db.get(NotificationTask, task_id)
    assert task is not None
    assert task.status is NotificationTaskStatus.completed
    assert task.attempts == 1
    assert task.config_id == config.id


def test_failures_back_off_and_end_failed_after_max_attempts(
        db: Session, rows: Rows, stub: HttpStub, notify_settings: Callable[..., Settings],
        notify_queue: Queue) -> None:
    settings = notify_settings(notifications={"max_attempts": 3, "retry_base_secs": 10,
                                              "retry_max_secs": 15})
    project = rows.project()
    rows.config(project, GH)
    rows.build(rows.evaluation(rows.jobset(project)), status=BuildStatus.failed)
    (task_id,) = service.collect_events(db, settings).task_ids
    db.commit()
    stub.answer("/github", 502)
    delays = []
    for attempt in range(3):
        before = utcnow()
        outcome = service.deliver(db, settings, task_id, attempt)
        task = db.get(NotificationTask, task_id)
        assert task is not None
        db.refresh(task)
        if attempt < 2:
            assert outcome == "retry"
            assert task.status is NotificationTaskStatus.pending
            assert task.next_retry_at is not None
            delays.append((task.next_retry_at - before).total_seconds())
        else:
            assert outcome == "failed"
            assert task.status is NotificationTaskStatus.failed
            assert task.completed_at is not None
    assert 9 <= delays[0] <= 11
    assert 14 <= delays[1] <= 16
    assert task.attempts == 3
    assert "answered 502" in (task.last_error or "")
    assert "gh-secret-token" not in (task.last_error or "")
    assert len(stub.requests) == 3
    # a stale message (for an attempt already made) delivers nothing
    assert service.deliver(db, settings, task_id, 1) == "stale"
    assert len(stub.requests) == 3


def test_a_rejected_token_fails_at_once(db: Session, rows: Rows, stub: HttpStub,
                                        notify_settings: Callable[..., Settings],
                                        notify_queue: Queue) -> None:
    settings = notify_settings()
    project = rows.project()
    rows.config(project, GH)
    rows.build(rows.evaluation(rows.jobset(project)))
    (task_id,) = service.collect_events(db, settings).task_ids
    db.commit()
    stub.answer("/github", 401)
    assert service.deliver(db, settings, task_id, 0) == "failed"
    task = db.get(NotificationTask, task_id)
    assert task is not None
    assert task.attempts == 1
    assert task.status is NotificationTaskStatus.failed


def test_an_older_commit_status_is_skipped_and_waits_for_one_in_flight(
        db: Session, rows: Rows, stub: HttpStub, notify_settings: Callable[..., Settings],
        notify_queue: Queue) -> None:
    settings = notify_settings()
    project = rows.project()
    rows.config(project, GH)
    hook = rows.config(project, NotificationType.webhook, url=stub.url + "/hook")
    build = rows.build(rows.evaluation(rows.jobset(project)))
    first = service.collect_events(db, settings).task_ids
    rows.stamp(build, BuildStatus.succeeded)
    second = service.collect_events(db, settings).task_ids
    db.commit()
    status_old, hook_old = first
    status_new, hook_new = second
    # the newer status goes first (as when the older one waits for a retry)
    assert service.deliver(db, settings, status_new, 0) == "completed"
    assert service.deliver(db, settings, status_old, 0) == "superseded"
    old = db.get(NotificationTask, status_old)
    assert old is not None
    assert old.status is NotificationTaskStatus.completed
    assert "superseded" in (old.last_error or "")
    assert [r.json()["state"] for r in stub.under("/github")] == ["success"]
    # webhooks get every event, in any order
    assert service.deliver(db, settings, hook_new, 0) == "completed"
    assert service.deliver(db, settings, hook_old, 0) == "completed"
    assert len(stub.under("/hook")) == 2
    assert db.get(NotificationTask, hook_old).config_id == hook.id  # type: ignore[union-attr]

    # a newer status waits while an older one is being delivered
    rows.stamp(build, BuildStatus.running)
    (running,) = [t for t in service.collect_events(db, settings).task_ids
                  if db.get(NotificationTask, t).type is GH]  # type: ignore[union-attr]
    rows.stamp(build, BuildStatus.failed)
    (final,) = [t for t in service.collect_events(db, settings).task_ids
                if db.get(NotificationTask, t).type is GH]  # type: ignore[union-attr]
    db.execute(text("UPDATE notification_tasks SET status = 'running', "
                    "next_retry_at = now() + interval '5 minutes' WHERE id = :id"),
               {"id": running})
    db.commit()
    assert service.deliver(db, settings, final, 0) == "deferred"
    waiting = db.get(NotificationTask, final)
    assert waiting is not None
    db.refresh(waiting)
    assert waiting.status is NotificationTaskStatus.pending
    assert waiting.attempts == 0


def test_retry_due_resends_due_tasks_and_recovers_lost_ones(
        db: Session, rows: Rows, notify_settings: Callable[..., Settings],
        notify_queue: Queue) -> None:
    settings = notify_settings()
    project = rows.project()
    rows.config(project, GH)
    evaluation = rows.evaluation(rows.jobset(project))
    for job in ("a", "b", "c", "d"):
        rows.build(evaluation, job)
    due, later, lost, exhausted = service.collect_events(db, settings).task_ids
    db.commit()
    now = utcnow()
    for task_id, values in (
            (due, {"next_retry_at": now - timedelta(seconds=1), "attempts": 1}),
            (later, {"next_retry_at": now + timedelta(minutes=5)}),
            (lost, {"status": "running", "attempts": 1,
                    "next_retry_at": now - timedelta(seconds=1)}),
            (exhausted, {"status": "running", "attempts": 3,
                         "next_retry_at": now - timedelta(seconds=1)})):
        sets = ", ".join(f"{k} = :{k}" for k in values)
        db.execute(text(f"UPDATE notification_tasks SET {sets} WHERE id = :id"),
                   {**values, "id": task_id})
    db.commit()
    notify_queue.clear()

    resent = service.retry_due(db, settings)
    db.commit()

    assert resent == [due, lost]
    assert notify_queue.messages() == [(DELIVER_TASK, [due, 1]), (DELIVER_TASK, [lost, 1])]
    states = dict(db.execute(text("SELECT id, status FROM notification_tasks")).all())
    assert states[exhausted] == "failed"
    assert states[lost] == "pending"
    # enqueued once: the next scan leaves them alone (their message is on its way)
    assert service.retry_due(db, settings) == []


def test_cleanup_deletes_old_finished_tasks(db: Session, rows: Rows,
                                            notify_settings: Callable[..., Settings],
                                            notify_queue: Queue) -> None:
    settings = notify_settings(notifications={"retention_days": 7})
    project = rows.project()
    rows.config(project, GH)
    evaluation = rows.evaluation(rows.jobset(project))
    for job in ("a", "b", "c", "d"):
        rows.build(evaluation, job)
    old_done, old_failed, old_pending, recent_done = service.collect_events(db, settings).task_ids
    db.commit()
    long_ago = utcnow() - timedelta(days=8)
    db.execute(text("""
        UPDATE notification_tasks SET status = CASE id WHEN :a THEN 'completed'
            WHEN :b THEN 'failed' WHEN :d THEN 'completed' ELSE status END,
            completed_at = CASE WHEN id IN (:a, :b) THEN CAST(:old AS timestamptz)
                                WHEN id = :d THEN now() END,
            created_at = CAST(:old AS timestamptz)
    """), {"a": old_done, "b": old_failed, "d": recent_done, "old": long_ago})
    assert service.cleanup(db, settings) == 2
    left = set(db.scalars(select(NotificationTask.id)))
    assert left == {old_pending, recent_done}


def test_a_reused_build_reports_to_every_commit_that_contains_it(
        db: Session, rows: Rows, stub: HttpStub, notify_settings: Callable[..., Settings],
        notify_queue: Queue) -> None:
    from circus.common.models import EvaluationBuild

    settings = notify_settings()
    project = rows.project()
    rows.config(project, GH)
    jobset = rows.jobset(project)
    build = rows.build(rows.evaluation(jobset), "hello", stamped=False)
    newer = "b" * 40
    later = rows.evaluation(jobset, commit=newer)
    db.add(EvaluationBuild(evaluation_id=later.id, build_id=build.id, is_new=False))
    rows.stamp(build, BuildStatus.succeeded)
    task_ids = service.collect_events(db, settings).task_ids
    db.commit()
    assert len(task_ids) == 2
    # statuses on different commits never supersede each other, whatever the order
    for task_id in reversed(task_ids):
        assert service.deliver(db, settings, task_id, 0) == "completed"
    posted = {r.path.rsplit("/", 1)[1]: r.json() for r in stub.under("/github")}
    assert set(posted) == {SHA, newer}
    assert {body["state"] for body in posted.values()} == {"success"}
    assert {body["context"] for body in posted.values()} == {"circus/widget/main/hello"}
    payloads = {db.get(NotificationTask, t).payload["commit"]: db.get(  # type: ignore[union-attr]
        NotificationTask, t).payload["evaluation_id"] for t in task_ids}  # type: ignore[union-attr]
    assert payloads == {SHA: build.evaluation_id, newer: later.id}
