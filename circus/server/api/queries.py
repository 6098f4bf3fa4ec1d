"""Read queries shared by the API views (and the dashboard): filters, counts, lookups."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from circus.common.enums import BuildStatus
from circus.common.errors import NotFound
from circus.common.models import Build, Evaluation, EvaluationBuild, Jobset


def filter_builds(query: Any, args: dict[str, Any]) -> Any:
    if "project_id" in args:
        query = query.where(Build.project_id == args["project_id"])
    if "jobset_id" in args:
        query = query.where(Build.jobset_id == args["jobset_id"])
    if "evaluation_id" in args:
        members = select(EvaluationBuild.build_id).where(
            EvaluationBuild.evaluation_id == args["evaluation_id"])
        query = query.where(or_(Build.evaluation_id == args["evaluation_id"],
                                Build.id.in_(members)))
    if "job_name" in args:
        query = query.where(Build.job_name == args["job_name"])
    if "status" in args:
        query = query.where(Build.status == args["status"])
    if "system" in args:
        query = query.where(Build.system == args["system"])
    if "finished" in args:
        unfinished = [BuildStatus.pending, BuildStatus.running]
        query = query.where(Build.status.not_in(unfinished) if args["finished"]
                            else Build.status.in_(unfinished))
    return query


def filter_evaluations(query: Any, args: dict[str, Any]) -> Any:
    if "jobset_id" in args:
        query = query.where(Evaluation.jobset_id == args["jobset_id"])
    if "project_id" in args:
        query = query.where(Evaluation.jobset_id.in_(
            select(Jobset.id).where(Jobset.project_id == args["project_id"])))
    if "status" in args:
        query = query.where(Evaluation.status == args["status"])
    if "trigger_kind" in args:
        query = query.where(Evaluation.trigger_kind == args["trigger_kind"])
    return query


def build_counts(session: Session, evaluation_ids: Iterable[int]) -> dict[int, dict[str, int]]:
    """Builds of each evaluation by status name, in one query."""
    ids = list(evaluation_ids)
    counts: dict[int, dict[str, int]] = defaultdict(dict)
    if not ids:
        return counts
    members = (select(EvaluationBuild.evaluation_id.label("eid"), EvaluationBuild.build_id)
               .where(EvaluationBuild.evaluation_id.in_(ids))
               .union(select(Build.evaluation_id.label("eid"), Build.id)
                      .where(Build.evaluation_id.in_(ids)))).subquery()
    rows = session.execute(
        select(members.c.eid, Build.status, func.count())
        .join(Build, Build.id == members.c.build_id)
        .group_by(members.c.eid, Build.status))
    for eid, status, count in rows:
        counts[eid][status.name] = count
    return counts


def get_evaluation(session: Session, evaluation_id: int) -> Evaluation:
    evaluation = session.get(Evaluation, evaluation_id)
    if evaluation is None:
        raise NotFound(f"no evaluation with id {evaluation_id}")
    return evaluation


def get_build(session: Session, build_id: int) -> Build:
    build = session.get(Build, build_id)
    if build is None:
        raise NotFound(f"no build with id {build_id}")
    return build
