"""Fixtures for evaluator tests: committed rows, real git repositories, real Nix."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from circus.common.celery import create_celery_app
from circus.common.config import Settings
from circus.common.enums import EvaluationStatus, InputType, TriggerKind
from circus.common.models import Build, Evaluation, Jobset, JobsetInput, Project
from circus.common.nix.environment import current_system
from circus.evaluator import execution, service
from tests.conftest import FIXTURES
from tests.helpers.gitrepo import GitRepo

NIX_FIXTURES = FIXTURES / "nix" / "evaluator"


def fixture_text(name: str, nonce: str, **extra: str) -> str:
    text = (NIX_FIXTURES / name).read_text()
    text = text.replace("@SYSTEM@", current_system()).replace("@NONCE@", nonce)
    for key, value in extra.items():
        text = text.replace(f"@{key}@", value)
    return text


@pytest.fixture
def eval_settings(make_settings: Callable[..., Settings], nix_env: dict[str, str]
                  ) -> Settings:
    return make_settings(evaluator={"nix_timeout": 120, "git_timeout": 30})


@pytest.fixture
def celery_app(eval_settings: Settings, engine: Engine) -> Iterator[Celery]:
    """A Celery app on the test broker, so ``enqueue`` publishes (nobody consumes)."""
    app = create_celery_app(eval_settings, engine=engine)
    yield app
    app.close()


@pytest.fixture
def factory(committed_db: sessionmaker[Session], celery_app: Celery) -> sessionmaker[Session]:
    return committed_db


class World:
    """Creates projects/jobsets and runs evaluations the way the worker does."""

    def __init__(self, factory: sessionmaker[Session], settings: Settings) -> None:
        self.factory = factory
        self.settings = settings
        self.count = 0

    def jobset(self, repository_url: str = "", *, flake: bool = True,
               expression: str = "hydraJobs", branch: str | None = "main",
               expression_input: str | None = None,
               inputs: list[tuple[str, InputType, str]] | None = None,
               **fields: Any) -> int:
        self.count += 1
        with self.factory() as session, session.begin():
            project = Project(name=f"p{self.count}", repository_url=repository_url)
            jobset = Jobset(project=project, name="main", flake_mode=flake,
                            nix_expression=expression, branch=branch,
                            nix_expression_input=expression_input, **fields)
            for name, kind, value in inputs or []:
                jobset.inputs.append(JobsetInput(name=name, input_type=kind, value=value))
            session.add_all([project, jobset])
            session.flush()
            return jobset.id

    def trigger(self, jobset_id: int, kind: TriggerKind = TriggerKind.manual) -> int:
        with self.factory() as session, session.begin():
            evaluation, _ = service.trigger(session, jobset_id, kind, requested_by="tests")
            return evaluation.id

    def run(self, evaluation_id: int, settings: Settings | None = None
            ) -> execution.Outcome:
        return execution.execute(self.factory, settings or self.settings, evaluation_id)

    def evaluate(self, jobset_id: int, settings: Settings | None = None) -> Evaluation:
        evaluation_id = self.trigger(jobset_id)
        self.run(evaluation_id, settings)
        return self.evaluation(evaluation_id)

    def check(self, jobset_id: int) -> str:
        with self.factory() as session, session.begin():
            return service.check_jobset(session, self.settings, jobset_id)

    def evaluation(self, evaluation_id: int) -> Evaluation:
        with self.factory() as session:
            evaluation = session.get_one(Evaluation, evaluation_id)
            _ = evaluation.errors
            return evaluation

    def latest(self, jobset_id: int) -> Evaluation | None:
        with self.factory() as session:
            evaluation = session.scalars(select(Evaluation).where(
                Evaluation.jobset_id == jobset_id).order_by(Evaluation.id.desc())).first()
            if evaluation is not None:
                _ = evaluation.errors
            return evaluation

    def count_evaluations(self, jobset_id: int) -> int:
        with self.factory() as session:
            return len(session.scalars(select(Evaluation.id).where(
                Evaluation.jobset_id == jobset_id)).all())

    def builds(self, evaluation_id: int, *, member: bool = True) -> dict[str, Build]:
        """Builds of an evaluation by job name (members, including reused ones)."""
        from circus.common.models import EvaluationBuild

        with self.factory() as session:
            query = select(Build)
            if member:
                query = query.join(EvaluationBuild, EvaluationBuild.build_id == Build.id).where(
                    EvaluationBuild.evaluation_id == evaluation_id)
            else:
                query = query.where(Build.evaluation_id == evaluation_id)
            builds = session.scalars(query).all()
            for build in builds:
                _ = build.outputs
            return {b.job_name: b for b in builds}

    def jobset_row(self, jobset_id: int) -> Jobset:
        with self.factory() as session:
            return session.get_one(Jobset, jobset_id)


@pytest.fixture
def world(factory: sessionmaker[Session], eval_settings: Settings) -> World:
    return World(factory, eval_settings)


@pytest.fixture
def flake_repo(git_repo: Callable[..., GitRepo], nonce: str) -> GitRepo:
    repo = git_repo("flake")
    repo.commit({"flake.nix": fixture_text("flake-jobs.nix", nonce)}, "initial")
    return repo


def completed(evaluation: Evaluation) -> Evaluation:
    assert evaluation.status is EvaluationStatus.completed, (
        evaluation.error_message, evaluation.stderr_tail)
    return evaluation


def store_path_exists(path: str) -> bool:
    return Path(path).exists()
