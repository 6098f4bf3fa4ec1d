"""Rows the dashboard shows, made directly (what the evaluator and queue runner leave).

Used by the page tests (in the rolled-back test transaction) and by the browser
tests (committed, for a real server process).
"""

from __future__ import annotations

import functools
import itertools
import secrets
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import zstandard
from sqlalchemy.orm import Session

from circus.auth import passwords
from circus.auth import service as auth_service
from circus.auth.actor import Actor
from circus.common.enums import (
    BuildStatus,
    EvaluationStatus,
    MemberRole,
    NotificationTaskStatus,
    NotificationType,
    Role,
    StepState,
    TriggerKind,
)
from circus.common.models import (
    Build,
    BuildMetric,
    BuildOutput,
    BuildProduct,
    BuildStep,
    Channel,
    Evaluation,
    EvaluationBuild,
    EvaluationError,
    Jobset,
    NotificationTask,
    Project,
    ProjectMember,
    Step,
    User,
)
from circus.common.models.base import utcnow

SYSTEM = Actor.system("test")
#: the password of the users the tests make (the login tests type it)
PASSWORD = "password-" + "x" * 8


@functools.cache
def password_hash() -> str:
    """The argon2id hash of ``PASSWORD``, made once: three users in every dashboard
    test hashed it again each time (0.6 s a hash at load 6-10, the setups took
    12-20 s in a loaded full run). Logging in still verifies it for real."""
    return passwords.hash_password(PASSWORD)
_counter = itertools.count(1)


def fake_store_path(name: str, suffix: str = "") -> str:
    return f"/nix/store/{next(_counter):032d}-{name}{suffix}"


class Rows:
    def __init__(self, db: Session, log_dir: Path) -> None:
        self.db = db
        self.log_dir = log_dir

    def user(self, username: str, role: Role = Role.read_only,
             password: str | None = PASSWORD) -> User:
        if password != PASSWORD:
            user = auth_service.create_user(self.db, SYSTEM, username=username, role=role,
                                            password=password)
        else:
            user = auth_service.create_user(self.db, SYSTEM, username=username, role=role)
            user.password_hash = password_hash()
        self.db.flush()
        return user

    def project(self, name: str = "demo", **values: Any) -> Project:
        values.setdefault("description", f"The {name} project")
        values.setdefault("repository_url", f"file:///srv/git/{name}")
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
        values.setdefault("commit_hash", secrets.token_hex(20))
        evaluation = Evaluation(jobset_id=jobset.id, trigger_kind=TriggerKind.manual,
                                status=status, **values)
        self.db.add(evaluation)
        self.db.flush()
        return evaluation

    def eval_error(self, evaluation: Evaluation, job: str, message: str) -> None:
        self.db.add(EvaluationError(evaluation_id=evaluation.id, job_name=job, message=message))
        self.db.flush()

    def build(self, evaluation: Evaluation, job: str, status: BuildStatus = BuildStatus.pending,
              *, outputs: dict[str, str] | None = None, drv_path: str | None = None,
              system: str = "x86_64-linux", **values: Any) -> Build:
        jobset = self.db.get(Jobset, evaluation.jobset_id)
        assert jobset is not None
        now = utcnow()
        if status.is_finished:
            values.setdefault("started_at", now - timedelta(seconds=75))
            values.setdefault("completed_at", now - timedelta(seconds=5))
        elif status is BuildStatus.running:
            values.setdefault("started_at", now - timedelta(seconds=30))
        build = Build(evaluation_id=evaluation.id, jobset_id=jobset.id,
                      project_id=jobset.project_id, job_name=job, system=system, status=status,
                      drv_path=drv_path or fake_store_path(job, ".drv"), **values)
        self.db.add(build)
        self.db.flush()
        for name, path in (outputs if outputs is not None
                           else {"out": fake_store_path(job)}).items():
            self.db.add(BuildOutput(build_id=build.id, name=name, path=path))
        self.db.add(EvaluationBuild(evaluation_id=evaluation.id, build_id=build.id, is_new=True))
        self.db.flush()
        return build

    def link(self, evaluation: Evaluation, build: Build) -> None:
        """A later evaluation reusing an earlier build (same derivation)."""
        self.db.add(EvaluationBuild(evaluation_id=evaluation.id, build_id=build.id,
                                    is_new=False))
        self.db.flush()

    def step(self, build: Build, *, drv_path: str | None = None, toplevel: bool = True,
             state: StepState = StepState.done, status: BuildStatus | None = None,
             log: str | None = None, compressed: bool = True, exit_code: int | None = None,
             propagated_from: Step | None = None, machine: str | None = "localhost",
             queue_class: str | None = None) -> Step:
        if state is StepState.done and status is None:
            status = build.status if build.status.is_finished else BuildStatus.succeeded
        now = utcnow()
        step = Step(drv_path=drv_path or (build.drv_path if toplevel
                                          else fake_store_path("dep", ".drv")),
                    system=build.system, required_features=[],
                    queue_class=queue_class or build.system, state=state, status=status,
                    machine=machine if state in (StepState.running, StepState.done) else None,
                    exit_code=exit_code,
                    started_at=now - timedelta(seconds=60) if state in (
                        StepState.running, StepState.done) else None,
                    finished_at=now - timedelta(seconds=10) if state is StepState.done else None,
                    queued_at=now - timedelta(seconds=90) if state is not StepState.pending
                    else None)
        self.db.add(step)
        self.db.flush()
        if log is not None:
            step.log_path = self.write_log(step.id, log, compressed=compressed)
            step.log_size = len(log.encode())
        number = self.db.query(BuildStep).filter_by(build_id=build.id).count() + 1
        self.db.add(BuildStep(build_id=build.id, step_nr=number, step_id=step.id,
                              drv_path=step.drv_path, is_toplevel=toplevel,
                              propagated_from_step_id=propagated_from.id
                              if propagated_from else None))
        self.db.flush()
        return step

    def write_log(self, step_id: int, text: str, *, compressed: bool) -> str:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        name = f"step-{step_id}.log" + (".zst" if compressed else "")
        data = text.encode()
        (self.log_dir / name).write_bytes(
            zstandard.ZstdCompressor().compress(data) if compressed else data)
        return name

    def product(self, build: Build, path: str, *, name: str | None = None,
                type: str = "file", subtype: str = "binary-dist",
                size: int | None = None, sha256: str | None = None) -> BuildProduct:
        product = BuildProduct(build_id=build.id, type=type, subtype=subtype,
                               name=name or Path(path).name, path=path, file_size=size,
                               sha256=sha256)
        self.db.add(product)
        self.db.flush()
        return product

    def metric(self, build: Build, name: str, value: float, unit: str | None = None) -> None:
        self.db.add(BuildMetric(build_id=build.id, name=name, value=value, unit=unit))
        self.db.flush()

    def channel(self, jobset: Jobset, name: str, evaluation: Evaluation | None) -> Channel:
        channel = Channel(project_id=jobset.project_id, jobset_id=jobset.id, name=name,
                          evaluation_id=evaluation.id if evaluation else None)
        self.db.add(channel)
        self.db.flush()
        return channel

    def notification(self, build: Build, status: NotificationTaskStatus) -> NotificationTask:
        task = NotificationTask(type=NotificationType.webhook, payload={"build_id": build.id},
                                status=status, build_id=build.id,
                                attempts=5 if status is NotificationTaskStatus.failed else 0,
                                last_error="connection refused"
                                if status is NotificationTaskStatus.failed else None)
        self.db.add(task)
        self.db.flush()
        return task


@dataclass
class World:
    project: Project
    jobset: Jobset
    old: Evaluation
    evaluation: Evaluation
    succeeded: Build
    failed: Build
    dependency_failed: Build
    running: Build
    queued: Build
    running_step: Step


def populate(rows: Rows, *, member: User | None = None, product_path: str | None = None
             ) -> World:
    """A project with two evaluations: builds in every interesting state, steps with
    logs (one running, its log still plain), a dependency failure, a product, a metric,
    a channel and a failed notification."""
    project = rows.project("demo")
    if member is not None:
        rows.db.add(ProjectMember(project_id=project.id, user_id=member.id,
                                  role=MemberRole.member))
    jobset = rows.jobset(project, "main", description="the main branch")
    old = rows.evaluation(jobset)
    old_hello = rows.build(old, "hello", BuildStatus.succeeded)
    rows.build(old, "removed-job", BuildStatus.succeeded)
    evaluation = rows.evaluation(jobset, eval_time=12.5, builds_new=4, builds_reused=1)
    rows.link(evaluation, old_hello)
    rows.eval_error(evaluation, "broken", "error: attribute 'nope' missing")
    out = str(Path(product_path).parent) if product_path else fake_store_path("tarball")
    succeeded = rows.build(evaluation, "tarball", BuildStatus.succeeded, outputs={"out": out})
    rows.step(succeeded, log="building tarball\nall done\n")
    rows.product(succeeded, product_path or out + "/demo.tar.gz", size=2048,
                 sha256="ab" * 32)
    rows.metric(succeeded, "closure-size", 1234.0, "bytes")
    failed = rows.build(evaluation, "tests", BuildStatus.failed, error_message="builder failed")
    rows.step(failed, log="running tests\nFAIL: test_everything\n", exit_code=1)
    dependency_failed = rows.build(evaluation, "docs", BuildStatus.dependency_failed)
    dep = rows.step(dependency_failed, toplevel=False, status=BuildStatus.failed,
                    log="compiling dependency\nerror: out of cheese\n", exit_code=2)
    rows.step(dependency_failed, status=BuildStatus.dependency_failed, propagated_from=dep,
              machine=None)
    running = rows.build(evaluation, "long-test", BuildStatus.running)
    running_step = rows.step(running, state=StepState.running, log="step 1 of 3\n",
                             compressed=False)
    queued = rows.build(evaluation, "queued-job", BuildStatus.pending)
    rows.step(queued, state=StepState.queued)
    rows.channel(jobset, "demo-unstable", old)
    rows.notification(failed, NotificationTaskStatus.failed)
    rows.db.flush()
    return World(project, jobset, old, evaluation, succeeded, failed, dependency_failed,
                 running, queued, running_step)
