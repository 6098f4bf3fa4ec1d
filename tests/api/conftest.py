"""Fixtures for API tests: a Flask app whose requests share the test's rolled-back transaction."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from circus.auth import service as auth_service
from circus.auth.actor import Actor
from circus.common.config import Settings
from circus.common.enums import BuildStatus, EvaluationStatus, Role, TriggerKind
from circus.common.models import (
    Build,
    BuildOutput,
    Evaluation,
    EvaluationBuild,
    Jobset,
    Project,
    User,
)
from circus.server.app import create_app
from circus.server.context import ServerContext

SYSTEM = Actor.system("test")


@pytest.fixture
def api_settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(server={"rate_limit_api": "100000/minute",
                                 "rate_limit_login": "1000/minute"})


def make_app(settings: Settings, engine: Engine, db: Session) -> Flask:
    app = create_app(settings, engine=engine)
    app.config["TESTING"] = True
    # every request's session joins the test's outer transaction (rolled back after)
    factory = sessionmaker(bind=db.bind, join_transaction_mode="create_savepoint",
                           expire_on_commit=False)
    app.extensions["circus"] = ServerContext(settings, engine, factory)
    return app


@pytest.fixture
def app(api_settings: Settings, engine: Engine, db: Session) -> Flask:
    return make_app(api_settings, engine, db)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


class Keys:
    """Creates API keys (and users) in the test transaction; returns request headers."""

    def __init__(self, db: Session) -> None:
        self.db = db

    def user(self, username: str, role: Role = Role.read_only,
             password: str | None = None) -> User:
        user = auth_service.create_user(self.db, SYSTEM, username=username, role=role,
                                        password=password)
        self.db.commit()
        return user

    def headers(self, role: Role = Role.admin, *, owner: User | None = None,
                name: str | None = None) -> dict[str, str]:
        _, secret = auth_service.create_api_key(
            self.db, SYSTEM, name=name or f"test-{role.value}", role=role,
            owner_id=owner.id if owner else None)
        self.db.commit()
        return {"Authorization": f"Bearer {secret}"}


@pytest.fixture
def keys(db: Session) -> Keys:
    return Keys(db)


@pytest.fixture
def admin(keys: Keys) -> dict[str, str]:
    return keys.headers(Role.admin, name="admin-key")


class World:
    """Rows for read tests: a project, a jobset, evaluations and builds."""

    def __init__(self, db: Session) -> None:
        self.db = db
        self.counter = 0

    def project(self, name: str = "proj", **values: Any) -> Project:
        project = Project(name=name, **values)
        self.db.add(project)
        self.db.flush()
        return project

    def jobset(self, project: Project, name: str = "main", **values: Any) -> Jobset:
        jobset = Jobset(project_id=project.id, name=name, **values)
        self.db.add(jobset)
        self.db.flush()
        return jobset

    def evaluation(self, jobset: Jobset, status: EvaluationStatus = EvaluationStatus.completed,
                   **values: Any) -> Evaluation:
        evaluation = Evaluation(jobset_id=jobset.id, trigger_kind=TriggerKind.manual,
                                status=status, **values)
        self.db.add(evaluation)
        self.db.flush()
        return evaluation

    def build(self, evaluation: Evaluation, job: str, status: BuildStatus = BuildStatus.pending,
              system: str = "x86_64-linux", outputs: dict[str, str] | None = None,
              **values: Any) -> Build:
        self.counter += 1
        jobset = self.db.get(Jobset, evaluation.jobset_id)
        assert jobset is not None
        build = Build(evaluation_id=evaluation.id, jobset_id=jobset.id,
                      project_id=jobset.project_id, job_name=job, system=system, status=status,
                      drv_path=f"/nix/store/{self.counter:032d}-{job}.drv", **values)
        self.db.add(build)
        self.db.flush()
        for name, path in (outputs or {}).items():
            self.db.add(BuildOutput(build_id=build.id, name=name, path=path))
        self.db.add(EvaluationBuild(evaluation_id=evaluation.id, build_id=build.id, is_new=True))
        self.db.flush()
        return build


@pytest.fixture
def world(db: Session) -> Iterator[World]:
    return World(db)
