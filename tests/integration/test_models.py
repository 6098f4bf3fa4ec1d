"""Constraints the data model enforces by itself."""

from __future__ import annotations

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from circus.common.enums import BuildStatus, EvaluationStatus, TriggerKind
from circus.common.models import Build, BuildOutput, Evaluation, Jobset, Project


def make_eval(db: Session) -> Evaluation:
    project = Project(name="p1")
    jobset = Jobset(project=project, name="main")
    db.add_all([project, jobset])
    db.flush()
    evaluation = Evaluation(jobset_id=jobset.id, trigger_kind=TriggerKind.manual)
    db.add(evaluation)
    db.flush()
    return evaluation


def test_build_status_is_stored_as_its_code(db: Session) -> None:
    evaluation = make_eval(db)
    build = Build(evaluation_id=evaluation.id, jobset_id=evaluation.jobset_id,
                  project_id=evaluation.jobset.project_id, job_name="hello",
                  drv_path="/nix/store/x-hello.drv", system="x86_64-linux",
                  status=BuildStatus.cached_failure)
    build.outputs.append(BuildOutput(name="out", path="/nix/store/x-hello"))
    db.add(build)
    db.flush()
    code = db.execute(select(Build.__table__.c.status).where(Build.id == build.id)).scalar_one()
    assert code == 9
    db.expire_all()
    assert db.get(Build, build.id).status is BuildStatus.cached_failure  # type: ignore[union-attr]
    assert db.get(Build, build.id).output_map == {"out": "/nix/store/x-hello"}  # type: ignore[union-attr]


def test_one_unfinished_evaluation_per_jobset(db: Session) -> None:
    evaluation = make_eval(db)
    db.add(Evaluation(jobset_id=evaluation.jobset_id, trigger_kind=TriggerKind.manual))
    with pytest.raises(IntegrityError):
        db.flush()


def test_finished_evaluations_may_pile_up(db: Session) -> None:
    evaluation = make_eval(db)
    evaluation.status = EvaluationStatus.completed
    db.flush()
    db.add(Evaluation(jobset_id=evaluation.jobset_id, trigger_kind=TriggerKind.manual))
    db.flush()


def test_project_names_are_checked(db: Session) -> None:
    db.add(Project(name="../etc"))
    with pytest.raises(IntegrityError):
        db.flush()


def test_enum_columns_reject_unknown_values(db: Session) -> None:
    evaluation = make_eval(db)
    # the CHECK constraint holds even for writers that bypass the ORM
    with pytest.raises(IntegrityError, match="ck_evaluations_evaluation_status"):
        db.execute(text("UPDATE evaluations SET status = 'exploded' WHERE id = :id"),
                   {"id": evaluation.id})
