"""Test factories: projects, jobsets, evaluations and builds from real derivations.

The evaluator is written in parallel; until it lands, tests create builds the
way it will: rows with ``status = pending, stepped_at = NULL`` plus their
outputs, committed together with ``pg_notify('circus_builds', ...)``.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.orm import Session

from circus.common.enums import EvaluationStatus, TriggerKind
from circus.common.messaging import BUILDS_CHANNEL
from circus.common.models import (
    Build,
    BuildConstituent,
    BuildOutput,
    Evaluation,
    EvaluationBuild,
    Jobset,
    Project,
)
from circus.common.nix.derivation import read_derivation

FIXTURES = Path(__file__).parent / "fixtures"
JOBS = FIXTURES / "jobs.nix"


def instantiate(attrs: list[str], nonce: str, env: Mapping[str, str],
                expr: Path = JOBS, args: Mapping[str, str | int] | None = None
                ) -> dict[str, str]:
    """``nix-instantiate`` the attributes; returns attr -> drv path."""
    argv = ["nix-instantiate", str(expr), "--argstr", "nonce", nonce]
    for key, value in (args or {}).items():
        if isinstance(value, int):
            argv += ["--arg", key, str(value)]
        else:
            argv += ["--argstr", key, value]
    for attr in attrs:
        argv += ["-A", attr]
    done = subprocess.run(argv, capture_output=True, text=True, env=dict(env), check=False)
    if done.returncode != 0:
        raise RuntimeError(f"nix-instantiate failed: {done.stderr}")
    drvs = done.stdout.split()
    assert len(drvs) == len(attrs), done.stdout
    return dict(zip(attrs, drvs, strict=True))


def make_jobset(session: Session, name: str = "qr", shares: int = 100, keep_nr: int = 3
                ) -> Jobset:
    project = session.execute(text("SELECT id FROM projects WHERE name = :n"),
                              {"n": name}).scalar()
    if project is None:
        obj = Project(name=name)
        session.add(obj)
        session.flush()
        project = obj.id
    count = session.execute(text("SELECT count(*) FROM jobsets")).scalar_one()
    jobset = Jobset(project_id=project, name=f"js{count}", scheduling_shares=shares,
                    keep_nr=keep_nr)
    session.add(jobset)
    session.flush()
    return jobset


def make_evaluation(session: Session, jobset: Jobset, pr_number: int | None = None
                    ) -> Evaluation:
    evaluation = Evaluation(jobset_id=jobset.id, trigger_kind=TriggerKind.manual,
                            status=EvaluationStatus.completed, pr_number=pr_number)
    session.add(evaluation)
    session.flush()
    return evaluation


def make_build(session: Session, evaluation: Evaluation, job_name: str, drv_path: str,
               **fields: object) -> Build:
    drv = read_derivation(drv_path)
    build = Build(evaluation_id=evaluation.id, jobset_id=evaluation.jobset_id,
                  project_id=session.get(Jobset, evaluation.jobset_id).project_id,  # type: ignore[union-attr]
                  job_name=job_name, drv_path=drv_path, system=drv.system,
                  required_features=drv.required_features, is_fod=drv.is_fixed_output,
                  **fields)
    session.add(build)
    session.flush()
    for name, out in drv.outputs.items():
        session.add(BuildOutput(build_id=build.id, name=name, path=out.path))
    session.add(EvaluationBuild(evaluation_id=evaluation.id, build_id=build.id, is_new=True))
    session.flush()
    return build


def make_builds(session: Session, drvs: Mapping[str, str], jobset: Jobset | None = None,
                notify: bool = True, pr_number: int | None = None, **fields: object
                ) -> dict[str, Build]:
    """One evaluation with a build per job, committed like the evaluator does."""
    jobset = jobset or make_jobset(session)
    evaluation = make_evaluation(session, jobset, pr_number)
    builds = {job: make_build(session, evaluation, job, drv, **fields)
              for job, drv in drvs.items()}
    if notify:
        session.execute(text("SELECT pg_notify(:channel, :eid)"),
                        {"channel": BUILDS_CHANNEL, "eid": str(evaluation.id)})
    session.commit()
    return builds


def add_constituents(session: Session, aggregate: Build, constituents: list[Build]) -> None:
    session.execute(text("UPDATE builds SET is_aggregate = true WHERE id = :id"),
                    {"id": aggregate.id})
    for member in constituents:
        session.add(BuildConstituent(aggregate_id=aggregate.id, constituent_id=member.id))
    session.commit()


def build_row(session: Session, build_id: int) -> dict[str, object]:
    row = session.execute(text("SELECT * FROM builds WHERE id = :id"), {"id": build_id})
    return dict(row.mappings().one())


def json_dump(value: object) -> str:
    return json.dumps(value, default=str, indent=1)
