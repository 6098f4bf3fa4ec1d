"""Fixtures of the notification and webhook tests: forge/Slack/webhook stubs, SMTP, rows."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from circus.common.celery import create_celery_app
from circus.common.config import Settings
from circus.common.enums import BuildStatus, EvaluationStatus, NotificationType, TriggerKind
from circus.common.models import (
    Build,
    BuildOutput,
    Evaluation,
    EvaluationBuild,
    Jobset,
    NotificationConfig,
    Project,
)
from tests.api.conftest import Keys, make_app
from tests.notifications.stubs import HttpStub, ServerCert, SmtpSink, make_server_cert, running

SHA = "0123456789abcdef0123456789abcdef01234567"
BASE_URL = "https://ci.example.org"


@pytest.fixture
def stub() -> Iterator[HttpStub]:
    yield from running(HttpStub())


@pytest.fixture
def smtp() -> Iterator[SmtpSink]:
    sink = SmtpSink().start()
    try:
        yield sink
    finally:
        sink.stop()


@pytest.fixture(scope="session")
def server_cert(tmp_path_factory: pytest.TempPathFactory) -> ServerCert:
    return make_server_cert(tmp_path_factory.mktemp("smtp-tls"))


@pytest.fixture
def notify_settings(make_settings: Callable[..., Settings], stub: HttpStub
                    ) -> Callable[..., Settings]:
    """Settings whose forge API URLs point at the stub; keyword overrides per section."""

    def make(**overrides: Any) -> Settings:
        notifications = {
            "github_api_url": stub.url + "/github", "github_token": "gh-secret-token",
            "gitea_url": stub.url + "/gitea", "gitea_token": "gitea-secret-token",
            "gitlab_url": stub.url + "/gitlab", "gitlab_token": "gl-secret-token",
            "max_attempts": 3, "retry_base_secs": 1, "retry_max_secs": 2,
            **overrides.pop("notifications", {}),
        }
        # the stubs listen on loopback, which the outbound guard refuses unless listed
        server = {"base_url": BASE_URL, "rate_limit_api": "100000/minute",
                  "outbound_allowlist": ["127.0.0.1"], **overrides.pop("server", {})}
        return make_settings(notifications=notifications, server=server, **overrides)

    return make


@pytest.fixture
def celery_app(settings: Settings, engine: Engine) -> Celery:
    """The current Celery app, publishing to the test Redis (services enqueue through it)."""
    return create_celery_app(settings, engine=engine)


class Queue:
    """The notifications queue in Redis, read the way kombu's Redis transport stores it."""

    def __init__(self, url: str, name: str = "notifications") -> None:
        if url.startswith("redis+socket://"):
            # kombu's socket scheme; redis-py calls it unix://
            url = "unix://" + url[len("redis+socket://"):]
        self.client = redis.Redis.from_url(url)
        self.name = name

    def clear(self) -> None:
        self.client.delete(self.name)

    def messages(self) -> list[tuple[str, list[Any]]]:
        """(task name, args) of every message waiting, oldest first."""
        found = []
        for raw in reversed(self.client.lrange(self.name, 0, -1)):
            message = json.loads(raw)
            body = message["body"]
            if message.get("properties", {}).get("body_encoding") == "base64":
                body = base64.b64decode(body)
            args = json.loads(body)[0]  # protocol 2: [args, kwargs, embed]
            found.append((message["headers"]["task"], list(args)))
        return found


@pytest.fixture
def notify_queue(redis_url: str, celery_app: Celery) -> Iterator[Queue]:
    queue = Queue(redis_url)
    queue.clear()
    yield queue
    queue.clear()


class Rows:
    """Projects, jobsets, evaluations, builds and notification configs in a session."""

    def __init__(self, db: Session) -> None:
        self.db = db
        self.counter = 0

    def project(self, name: str = "widget",
                repository_url: str = "https://github.com/acme/widget.git") -> Project:
        project = Project(name=name, repository_url=repository_url)
        self.db.add(project)
        self.db.flush()
        return project

    def jobset(self, project: Project, name: str = "main", branch: str | None = "main",
               **values: Any) -> Jobset:
        jobset = Jobset(project_id=project.id, name=name, branch=branch, **values)
        self.db.add(jobset)
        self.db.flush()
        return jobset

    def evaluation(self, jobset: Jobset, commit: str | None = SHA, **values: Any
                   ) -> Evaluation:
        evaluation = Evaluation(jobset_id=jobset.id, trigger_kind=TriggerKind.manual,
                                status=EvaluationStatus.completed, commit_hash=commit, **values)
        self.db.add(evaluation)
        self.db.flush()
        return evaluation

    def build(self, evaluation: Evaluation, job: str = "hello",
              status: BuildStatus = BuildStatus.pending, stamped: bool = True,
              **values: Any) -> Build:
        self.counter += 1
        jobset = self.db.get(Jobset, evaluation.jobset_id)
        assert jobset is not None
        build = Build(evaluation_id=evaluation.id, jobset_id=jobset.id,
                      project_id=jobset.project_id, job_name=job, system="x86_64-linux",
                      status=status, drv_path=f"/nix/store/{self.counter:032d}-{job}.drv",
                      notification_pending_since=self._now() if stamped else None, **values)
        self.db.add(build)
        self.db.flush()
        self.db.add(BuildOutput(build_id=build.id, name="out",
                                path=f"/nix/store/{self.counter:032d}-{job}"))
        self.db.add(EvaluationBuild(evaluation_id=evaluation.id, build_id=build.id,
                                    is_new=True))
        self.db.flush()
        return build

    def config(self, project: Project, type: NotificationType, enabled: bool = True,
               **config: Any) -> NotificationConfig:
        row = NotificationConfig(project_id=project.id, type=type, config=config,
                                 enabled=enabled)
        self.db.add(row)
        self.db.flush()
        return row

    def stamp(self, build: Build, status: BuildStatus) -> None:
        """What the queue runner does: change the status and stamp the build."""
        build.status = status
        build.notification_pending_since = self._now()
        self.db.flush()

    @staticmethod
    def _now() -> Any:
        from circus.common.models.base import utcnow

        return utcnow()


@pytest.fixture
def rows(db: Session) -> Rows:
    return Rows(db)


@pytest.fixture
def api_app(notify_settings: Callable[..., Settings], engine: Engine, db: Session) -> Flask:
    return make_app(notify_settings(), engine, db)


@pytest.fixture
def client(api_app: Flask) -> FlaskClient:
    return api_app.test_client()


@pytest.fixture
def keys(db: Session) -> Keys:
    return Keys(db)


def tmp_file(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)
