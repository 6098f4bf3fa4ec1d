"""Each target against its stand-in: Gitea/Forgejo/GitLab statuses, webhook, Slack, SMTP."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy.orm import Session

from circus.common.config import Settings
from circus.common.enums import BuildStatus, NotificationTaskStatus, NotificationType
from circus.common.models import Build, NotificationTask, Project
from circus.notifications import service
from circus.notifications.base import DeliveryError, parse_repository
from tests.api.conftest import Keys
from tests.notifications.conftest import BASE_URL, SHA, Queue, Rows
from tests.notifications.stubs import HttpStub, ServerCert, SmtpSink


def deliver_all(db: Session, settings: Settings) -> list[NotificationTask]:
    """Collect, then deliver every new task once; returns the tasks."""
    ids = service.collect_events(db, settings).task_ids
    db.commit()
    for task_id in ids:
        service.deliver(db, settings, task_id, 0)
    found = [db.get(NotificationTask, task_id) for task_id in ids]
    for task in found:
        assert task is not None
        db.refresh(task)
    return [t for t in found if t is not None]


def one_build(rows: Rows, project: Project, status: BuildStatus, job: str = "hello") -> Build:
    return rows.build(rows.evaluation(rows.jobset(project)), job, status=status)


@pytest.mark.parametrize("kind", ["gitea", "forgejo"])
def test_gitea_and_forgejo_statuses(kind: str, db: Session, rows: Rows, stub: HttpStub,
                                    notify_settings: Callable[..., Settings],
                                    notify_queue: Queue) -> None:
    # no forge URL configured: it comes from the project's repository, so the server's
    # token is not sent there (the project gives its own; tests/security covers the rest)
    settings = notify_settings(notifications={"gitea_url": None})
    project = rows.project(repository_url=f"{stub.url}/org/app.git")
    rows.config(project, NotificationType(f"{kind}_status"), context="ci", token="own-token")
    build = one_build(rows, project, BuildStatus.timeout)
    (task,) = deliver_all(db, settings)
    assert task.status is NotificationTaskStatus.completed, task.last_error
    (request,) = stub.requests
    assert request.path == f"/api/v1/repos/org/app/statuses/{SHA}"
    assert request.headers["authorization"] == "token own-token"
    assert request.json() == {"state": "failure", "context": "ci/widget/main/hello",
                              "description": "build timed out",
                              "target_url": f"{BASE_URL}/build/{build.id}"}


def test_gitlab_pipeline_states(db: Session, rows: Rows, stub: HttpStub,
                                notify_settings: Callable[..., Settings],
                                notify_queue: Queue) -> None:
    settings = notify_settings()
    project = rows.project(repository_url="git@gitlab.example.org:group/sub/app.git")
    rows.config(project, NotificationType.gitlab_status, token="per-config-token")
    build = one_build(rows, project, BuildStatus.running)
    deliver_all(db, settings)
    rows.stamp(build, BuildStatus.cancelled)
    deliver_all(db, settings)
    started, cancelled = stub.requests
    assert started.path == f"/gitlab/api/v4/projects/group%2Fsub%2Fapp/statuses/{SHA}"
    assert started.headers["private-token"] == "per-config-token"
    assert started.json()["state"] == "running"
    assert started.json()["name"] == "circus/widget/main/hello"
    assert cancelled.json()["state"] == "canceled"


def test_json_webhook_is_signed_and_filtered(db: Session, rows: Rows, stub: HttpStub,
                                            notify_settings: Callable[..., Settings],
                                            notify_queue: Queue) -> None:
    settings = notify_settings()
    project = rows.project()
    rows.config(project, NotificationType.webhook, url=stub.url + "/hook", secret="s3cret",
                events=["finished"])
    build = one_build(rows, project, BuildStatus.pending)
    assert deliver_all(db, settings) == []  # queued is not among its events
    rows.stamp(build, BuildStatus.dependency_failed)
    (task,) = deliver_all(db, settings)
    assert task.status is NotificationTaskStatus.completed
    (request,) = stub.requests
    expected = hmac.new(b"s3cret", request.body, hashlib.sha256).hexdigest()
    assert request.headers["x-circus-signature-256"] == f"sha256={expected}"
    assert request.headers["x-circus-event"] == "finished"
    body = request.json()
    assert body["event"] == "finished"
    assert body["commit"] == SHA
    assert body["build"]["id"] == build.id
    assert body["build"]["status"] == "dependency_failed"
    assert not body["build"]["success"]
    assert body["repository_url"] == "https://github.com/acme/widget.git"


def test_slack_reports_finished_builds(db: Session, rows: Rows, stub: HttpStub,
                                       notify_settings: Callable[..., Settings],
                                       notify_queue: Queue) -> None:
    settings = notify_settings(notifications={"slack": {
        "enabled": True, "webhook_url": stub.url + "/services/T0/B0/secret"}})
    project = rows.project()
    rows.config(project, NotificationType.slack)
    rows.config(project, NotificationType.slack, on_failure_only=True,
                webhook_url=stub.url + "/services/T1/B1/other")
    build = one_build(rows, project, BuildStatus.running)
    assert deliver_all(db, settings) == []  # started: not worth a message
    rows.stamp(build, BuildStatus.succeeded)
    deliver_all(db, settings)
    (request,) = stub.requests
    assert request.path == "/services/T0/B0/secret"
    text = request.json()["text"]
    assert f"<{BASE_URL}/build/{build.id}|widget:main:hello>" in text
    assert "build succeeded" in text


def test_slack_errors_never_show_the_webhook_url(db: Session, rows: Rows, stub: HttpStub,
                                                 notify_settings: Callable[..., Settings],
                                                 notify_queue: Queue) -> None:
    settings = notify_settings()
    project = rows.project()
    rows.config(project, NotificationType.slack, webhook_url=stub.url + "/services/T/B/XyZ")
    one_build(rows, project, BuildStatus.failed)
    stub.answer("/services", 500)
    (task,) = deliver_all(db, settings)
    assert task.status is NotificationTaskStatus.pending
    assert "answered 500" in (task.last_error or "")
    assert "XyZ" not in (task.last_error or "")


def test_email_only_for_failures_when_asked(db: Session, rows: Rows, smtp: SmtpSink,
                                            notify_settings: Callable[..., Settings],
                                            notify_queue: Queue) -> None:
    settings = notify_settings(notifications={"email": {
        "enabled": True, "host": "127.0.0.1", "port": smtp.port, "on_failure_only": False,
        "from_address": "ci@example.org"}})
    project = rows.project()
    rows.config(project, NotificationType.email, to=["all@example.org"])
    rows.config(project, NotificationType.email, to="fails@example.org, lead@example.org",
                on_failure_only=True)
    evaluation = rows.evaluation(rows.jobset(project))
    ok = rows.build(evaluation, "ok", status=BuildStatus.succeeded)
    bad = rows.build(evaluation, "bad", status=BuildStatus.failed, error_message="exit 3")
    tasks = deliver_all(db, settings)
    assert [t.status for t in tasks] == [NotificationTaskStatus.completed] * 3
    sent = sorted((tuple(m.recipients), m.message["Subject"]) for m in smtp.received)
    assert sent == [
        (("all@example.org",), "[circus] widget:main:bad: build failed"),
        (("all@example.org",), "[circus] widget:main:ok: build succeeded"),
        # on_failure_only: the failed build only
        (("fails@example.org", "lead@example.org"), "[circus] widget:main:bad: build failed"),
    ]
    failure = next(m.message for m in smtp.received if "fails@example.org" in m.recipients)
    assert failure["From"] == "ci@example.org"
    assert failure["To"] == "fails@example.org, lead@example.org"
    assert f"{BASE_URL}/build/{bad.id}" in failure.get_payload()
    assert "exit 3" in failure.get_payload()
    assert ok.id != bad.id


@pytest.mark.parametrize("mode", ["starttls", "tls"])
def test_email_over_tls(mode: str, db: Session, rows: Rows, server_cert: ServerCert,
                        notify_settings: Callable[..., Settings], notify_queue: Queue) -> None:
    context = server_cert.server_context()
    sink = SmtpSink(**{"starttls" if mode == "starttls" else "implicit_tls": context}).start()
    try:
        settings = notify_settings(notifications={"email": {
            "enabled": True, "host": "127.0.0.1", "port": sink.port,
            "starttls": mode == "starttls", "tls": mode == "tls",
            "ca_file": str(server_cert.cert_file), "to": ["dev@example.org"]}})
        project = rows.project()
        rows.config(project, NotificationType.email)
        one_build(rows, project, BuildStatus.failed)
        (task,) = deliver_all(db, settings)
        assert task.status is NotificationTaskStatus.completed, task.last_error
        (mail,) = sink.received
        assert mail.recipients == ["dev@example.org"]
        if mode == "starttls":
            assert mail.tls
    finally:
        sink.stop()


def test_untrusted_smtp_certificate_is_retried_not_ignored(
        db: Session, rows: Rows, server_cert: ServerCert,
        notify_settings: Callable[..., Settings], notify_queue: Queue) -> None:
    sink = SmtpSink(starttls=server_cert.server_context()).start()
    try:
        settings = notify_settings(notifications={"email": {
            "enabled": True, "host": "127.0.0.1", "port": sink.port, "starttls": True,
            "to": ["dev@example.org"]}})
        project = rows.project()
        rows.config(project, NotificationType.email)
        one_build(rows, project, BuildStatus.failed)
        (task,) = deliver_all(db, settings)
        assert task.status is NotificationTaskStatus.pending
        assert "SSLCertVerificationError" in (task.last_error or "")
        assert sink.received == []
    finally:
        sink.stop()


def test_token_file_and_missing_token(db: Session, rows: Rows, stub: HttpStub, tmp_path: Path,
                                      notify_settings: Callable[..., Settings],
                                      notify_queue: Queue) -> None:
    settings = notify_settings(notifications={"github_token": None})
    project = rows.project(repository_url="github:acme/widget")
    token_file = tmp_path / "token"
    token_file.write_text("from-a-file\n")
    with_file = rows.config(project, NotificationType.github_status,
                            token_file=str(token_file), repository="acme/other")
    with_file.managed_declaratively = True  # files are for server-side configs only
    without = rows.config(project, NotificationType.github_status)
    one_build(rows, project, BuildStatus.succeeded)
    tasks = {t.config_id: t for t in deliver_all(db, settings)}
    assert tasks[with_file.id].status is NotificationTaskStatus.completed
    (request,) = stub.requests
    assert request.headers["authorization"] == "Bearer from-a-file"
    assert request.path == f"/github/repos/acme/other/statuses/{SHA}"
    assert tasks[without.id].status is NotificationTaskStatus.failed
    assert "no GitHub token" in (tasks[without.id].last_error or "")


@pytest.mark.parametrize(("url", "host", "path"), [
    ("https://github.com/acme/widget.git", "github.com", "acme/widget"),
    ("git+https://gitea.example.org:3000/o/r", "gitea.example.org:3000", "o/r"),
    ("ssh://git@gitlab.com/g/s/r.git", "gitlab.com", "g/s/r"),
    ("git@github.com:acme/widget.git", "github.com", "acme/widget"),
    ("github:acme/widget", "github.com", "acme/widget"),
])
def test_repository_urls(url: str, host: str, path: str) -> None:
    parsed = parse_repository(url)
    assert (parsed.host, parsed.path) == (host, path)


def test_unparseable_repository_is_a_permanent_error() -> None:
    with pytest.raises(DeliveryError) as caught:
        parse_repository("/srv/git/local-only")
    assert caught.value.permanent


@pytest.mark.parametrize(("type", "config", "fragment"), [
    ("webhook", {}, "url is required"),
    ("webhook", {"url": "ftp://x/y"}, "url must be an http(s) URL"),
    ("webhook", {"url": "http://x/y", "events": ["exploded"]}, "events must be a list"),
    ("github_status", {"jobs": "("}, "jobs is not a valid regular expression"),
    ("email", {"to": "not-an-address"}, "not an email address"),
    ("slack", {"on_failure_only": "yes"}, "on_failure_only must be true or false"),
])
def test_bad_configs_are_rejected_by_the_api(type: str, config: dict[str, Any], fragment: str,
                                             client: FlaskClient, keys: Keys, rows: Rows,
                                             db: Session) -> None:
    rows.project()
    db.commit()
    answer = client.post("/api/v1/projects/widget/notifications", headers=keys.headers(),
                         data=json.dumps({"type": type, "config": config}),
                         content_type="application/json")
    assert answer.status_code == 400, answer.json
    assert fragment in answer.json["error"]
    good = client.post("/api/v1/projects/widget/notifications", headers=keys.headers(),
                       json={"type": "webhook", "config": {"url": "https://hooks.example/x"}})
    assert good.status_code == 201
