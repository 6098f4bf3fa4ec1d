"""/api/v1/evaluations: list, show (with eval errors), trigger, cancel, compare."""

from __future__ import annotations

from typing import Any

from flask import jsonify
from flask.typing import ResponseReturnValue

from circus.common.models import Evaluation
from circus.evaluator import service as evaluator
from circus.projects import service as projects
from circus.server import actions
from circus.server.api.base import Blueprint, paginate
from circus.server.api.listrows import evaluation_dicts, select_evaluations
from circus.server.api.queries import (
    build_counts,
    evaluation_total,
    filter_evaluations,
    get_evaluation,
)
from circus.server.api.schemas.builds import (
    CompareArgsSchema,
    ComparisonSchema,
    EvaluationDetailSchema,
    EvaluationFilterSchema,
    EvaluationSchema,
    TriggerSchema,
)
from circus.server.api.schemas.common import page_of
from circus.server.auth import current_actor
from circus.server.context import db_session

blp = Blueprint("evaluations", __name__, url_prefix="/api/v1/evaluations",
                description="Evaluations of jobsets")


def _with_counts(evaluations: list[Evaluation]) -> list[Evaluation]:
    counts = build_counts(db_session(), (e.id for e in evaluations))
    for evaluation in evaluations:
        evaluation.build_counts = counts.get(evaluation.id, {})  # type: ignore[attr-defined]
    return evaluations


@blp.get("")
@blp.arguments(EvaluationFilterSchema, location="query")
@blp.response(200, page_of(EvaluationSchema))
def list_evaluations(args: dict[str, Any]) -> Any:
    session = db_session()
    actor = current_actor()
    query = filter_evaluations(select_evaluations(), args, actor).order_by(
        Evaluation.id.desc())
    page = paginate(session, query, args, scalars=False, cursor_column=Evaluation.id,
                    total=evaluation_total(session, args, actor))
    counts = build_counts(session, (row[0] for row in page["items"]))
    return jsonify({**page, "items": evaluation_dicts(session, page["items"], counts)})


@blp.get("/<id:evaluation_id>")
@blp.response(200, EvaluationDetailSchema)
def get_evaluation_view(evaluation_id: int) -> Any:
    return _with_counts([get_evaluation(db_session(), evaluation_id, current_actor())])[0]


@blp.post("/trigger")
@blp.arguments(TriggerSchema)
@blp.response(202, EvaluationSchema)
def trigger(data: dict[str, Any]) -> Any:
    """Queue an evaluation now (or answer with the jobset's pending/running one)."""
    session = db_session()
    actor = current_actor()
    if "jobset_id" in data:
        jobset = projects.get_jobset_by_id(session, data["jobset_id"])
    else:
        project = projects.get_project(session, data["project"])
        jobset = projects.get_jobset(session, project, data["jobset"])
    evaluation, _ = actions.trigger_evaluation(session, actor, jobset)
    session.commit()
    return _with_counts([evaluation])[0]


@blp.post("/<id:evaluation_id>/cancel")
@blp.response(200, EvaluationSchema)
def cancel(evaluation_id: int) -> ResponseReturnValue:
    session = db_session()
    evaluation = actions.cancel_evaluation(session, current_actor(), evaluation_id)
    session.commit()
    return _with_counts([evaluation])[0]  # type: ignore[return-value]


@blp.get("/<id:evaluation_id>/compare")
@blp.arguments(CompareArgsSchema, location="query")
@blp.response(200, ComparisonSchema)
def compare(args: dict[str, Any], evaluation_id: int) -> Any:
    session = db_session()
    actor = current_actor()
    get_evaluation(session, evaluation_id, actor)
    get_evaluation(session, args["to"], actor)
    result = evaluator.compare(session, evaluation_id, args["to"])
    return {"evaluation_id": evaluation_id, "other_id": args["to"], "new_jobs": result.new_jobs,
            "removed_jobs": result.removed_jobs, "changed_jobs": result.changed_jobs,
            "unchanged_count": result.unchanged_count}
