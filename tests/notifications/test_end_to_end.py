"""Real builds through ``circus-queue-runner``, notifications sent by ``circus-evaluator``.

The runner stamps builds as it steps, starts and finishes them; the evaluator
daemon's beat collects the stamps and its workers deliver to a GitHub stand-in
(and a real SMTP server). A second GitHub config points at an endpoint answering
500: its tasks back off, end ``failed`` after ``max_attempts``, and the admin
retry endpoint brings one back and delivers it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flask.testing import FlaskClient
from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker

from circus.auth import service as auth_service
from circus.auth.actor import Actor
from circus.common.enums import (
    BuildStatus,
    EvaluationStatus,
    NotificationTaskStatus,
    NotificationType,
    Role,
    TriggerKind,
)
from circus.common.messaging import BUILDS_CHANNEL
from circus.common.models import Build, Evaluation, NotificationConfig, NotificationTask
from circus.server.app import create_app
from tests.helpers.daemons import Daemon, circus_command, wait_until
from tests.notifications.conftest import SHA
from tests.notifications.stubs import HttpStub, Recorded, SmtpSink
from tests.queue_runner.conftest import TEST_RUNNER
from tests.queue_runner.daemons import flatten, runner_daemon
from tests.queue_runner.factories import instantiate, make_build, make_jobset

BASE = "https://ci.example.org"


def statuses(stub: HttpStub, prefix: str, build_id: int) -> list[Recorded]:
    return [r for r in stub.under(prefix) if r.json()["target_url"] == f"{BASE}/build/{build_id}"]


def states(requests: list[Recorded]) -> list[tuple[str, str]]:
    return [(r.json()["state"], r.json()["description"]) for r in requests]


def test_build_statuses_reach_github_email_and_retries(
        committed_db: sessionmaker[Session], database_url: str, redis_url: str,
        stub: HttpStub, smtp: SmtpSink, tmp_path: Path, nonce: str,
        nix_env: dict[str, str]) -> None:
    config: dict[str, Any] = {
        "database": {"url": database_url},
        "broker": {"url": redis_url},
        "nix": {"substituters": []},
        "logs": {"log_dir": str(tmp_path / "logs")},
        "gc": {"gc_roots_dir": str(tmp_path / "gcroots")},
        "evaluator": {"work_dir": str(tmp_path / "evaluator")},
        "server": {"base_url": BASE, "secret_key": "e2e-secret-key-" + "x" * 32,
                   "outbound_allowlist": ["127.0.0.1"]},
        # no runner builds at first: unsupported_timeout must not fail the queued steps
        "queue_runner": {**TEST_RUNNER, "unsupported_timeout": 600},
        "notifications": {
            "github_api_url": stub.url + "/github", "github_token": "gh-token",
            "collect_interval": 0.3, "max_attempts": 3, "retry_base_secs": 1,
            "retry_max_secs": 2,
            "email": {"enabled": True, "host": "127.0.0.1", "port": smtp.port,
                      "from_address": "circus@example.org"},
        },
        "tracing": {"level": "info"},
    }
    drvs = instantiate(["wait", "fails"], nonce, nix_env, args={"sleep": "2"})
    with committed_db() as session:
        jobset = make_jobset(session, "widget")
        session.execute(text("UPDATE projects SET repository_url = :url WHERE id = :id"),
                        {"url": "https://github.com/acme/widget", "id": jobset.project_id})
        evaluation = Evaluation(jobset_id=jobset.id, trigger_kind=TriggerKind.manual,
                                status=EvaluationStatus.completed, commit_hash=SHA)
        session.add(evaluation)
        session.flush()
        ok = make_build(session, evaluation, "wait", drvs["wait"])
        bad = make_build(session, evaluation, "fails", drvs["fails"])
        github = NotificationConfig(project_id=jobset.project_id,
                                    type=NotificationType.github_status, config={})
        broken = NotificationConfig(project_id=jobset.project_id,
                                    type=NotificationType.github_status,
                                    # another URL: the server's token is not sent
                                    # there, so this config brings its own
                                    config={"api_url": stub.url + "/broken",
                                            "token": "broken-token"})
        email = NotificationConfig(project_id=jobset.project_id, type=NotificationType.email,
                                   config={"to": ["dev@example.org"], "on_failure_only": True})
        session.add_all([github, broken, email])
        session.execute(text("SELECT pg_notify(:channel, :e)"),
                        {"channel": BUILDS_CHANNEL, "e": str(evaluation.id)})
        session.commit()
        ok_id, bad_id, broken_id = ok.id, bad.id, broken.id
        context = f"circus/widget/{jobset.name}"
    stub.answer("/broken", 500)

    env = {k: v for k, v in os.environ.items() if not k.startswith("CIRCUS_")}
    env.update(nix_env)
    env.update(flatten(config))
    logs = tmp_path / "daemons"
    evaluator = Daemon("evaluator", [circus_command("circus-evaluator")], logs, env=env,
                       cwd=tmp_path)
    dispatcher = runner_daemon("dispatcher", config, logs, workers=0)
    builder = runner_daemon("builder", config, logs, workers=2, dispatcher=False)
    try:
        evaluator.start()
        dispatcher.start()
        # stepped, nobody builds yet: both builds are reported queued
        stub.wait_for(lambda _: all(states(statuses(stub, "/github", b))[:1] ==
                                    [("pending", "queued")] for b in (ok_id, bad_id)),
                      timeout=60, what="queued statuses")
        builder.start()
        stub.wait_for(lambda _: [s for s, _ in states(statuses(stub, "/github", ok_id))][-1:]
                      == ["success"] and
                      [s for s, _ in states(statuses(stub, "/github", bad_id))][-1:]
                      == ["failure"], timeout=90, what="final statuses")
        # the sleeping build was seen building; every status for the right commit and check
        assert states(statuses(stub, "/github", ok_id)) == [
            ("pending", "queued"), ("pending", "building"), ("success", "build succeeded")]
        assert states(statuses(stub, "/github", bad_id))[0] == ("pending", "queued")
        for request in stub.under("/github"):
            assert request.path == f"/github/repos/acme/widget/statuses/{SHA}"
            assert request.headers["authorization"] == "Bearer gh-token"
            assert request.json()["context"] in (f"{context}/wait", f"{context}/fails")

        # the broken endpoint: three attempts with back-off (1 s, then 2 s), then failed
        def final_broken() -> NotificationTask | None:
            with committed_db() as session:
                return session.scalar(select(NotificationTask).where(
                    NotificationTask.build_id == ok_id, NotificationTask.config_id == broken_id,
                    NotificationTask.status == NotificationTaskStatus.failed,
                    NotificationTask.payload["event"].astext == "finished"))

        wait_until(lambda: final_broken() is not None, timeout=60,
                   message="the failing deliveries to give up")
        failed = final_broken()
        assert failed is not None
        assert failed.attempts == 3
        assert "answered 500" in (failed.last_error or "")
        attempts = [r.at for r in statuses(stub, "/broken", ok_id)
                    if r.json()["state"] == "success"]
        assert len(attempts) == 3
        assert attempts[1] - attempts[0] >= 0.9
        assert attempts[2] - attempts[1] >= 1.9

        # email: only the failing build, once
        wait_until(lambda: len(smtp.received) >= 1, timeout=30, message="the email")
        with committed_db() as session:
            assert session.get(Build, bad_id).status is BuildStatus.failed  # type: ignore[union-attr]
            email_tasks = session.scalars(select(NotificationTask).where(
                NotificationTask.type == NotificationType.email)).all()
            assert [t.build_id for t in email_tasks] == [bad_id]
        (mail,) = smtp.received
        assert mail.recipients == ["dev@example.org"]
        assert "fails: build failed" in mail.message["Subject"]

        # the admin retry brings the failed task back, and it is delivered
        stub.clear_rules()
        with committed_db() as session:
            _, key = auth_service.create_api_key(session, Actor.system("test"), name="admin",
                                                 role=Role.admin)
            session.commit()
        from circus.common.config import load_settings

        app = create_app(load_settings(files=[], environ={}, overrides=config))
        client: FlaskClient = app.test_client()
        answer = client.post(f"/api/v1/admin/notification-tasks/{failed.id}/retry",
                             headers={"Authorization": f"Bearer {key}"})
        assert answer.status_code == 200, answer.json
        assert answer.json["status"] == "pending"
        assert answer.json["attempts"] == 0
        stub.wait_for(lambda _: any(r.status == 201 for r in statuses(stub, "/broken", ok_id)),
                      timeout=30, what="the retried delivery")
        wait_until(lambda: _status(committed_db, failed.id) == "completed", timeout=15,
                   message="the retried task to complete")
        assert evaluator.alive()
        assert dispatcher.alive()
        assert builder.alive()
    except BaseException:
        print("--- evaluator log ---\n" + evaluator.log()[-4000:])
        print("--- builder log ---\n" + builder.log()[-2000:])
        raise
    finally:
        for daemon in (builder, dispatcher, evaluator):
            daemon.stop()


def _status(factory: Callable[[], Session], task_id: int) -> str:
    with factory() as session:
        return str(session.execute(text("SELECT status FROM notification_tasks WHERE id = :id"),
                                   {"id": task_id}).scalar())
