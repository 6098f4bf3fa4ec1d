"""An evaluation: its builds by status, its per-job errors, and what changed since another."""

from __future__ import annotations

from flask import abort, flash, redirect, render_template, request, url_for
from flask.typing import ResponseReturnValue
from sqlalchemy import func, select

from circus.auth.permissions import allowed_actions
from circus.auth.visibility import can_see_project
from circus.common.errors import NotFound
from circus.common.models import Evaluation, EvaluationError, Jobset
from circus.evaluator import service as evaluator
from circus.server import actions
from circus.server.api.queries import loaded_build_counts
from circus.server.auth import current_actor
from circus.server.context import db_session
from circus.server.dashboard import queries
from circus.server.dashboard.access import page
from circus.server.dashboard.blueprint import blueprint
from circus.server.dashboard.pagination import paginate

BUILDS_PER_PAGE = 100
ERRORS_SHOWN = 200
COMPARE_SHOWN = 500


@blueprint.get("/eval/<id:evaluation_id>")
@page("evaluation")
def evaluation(evaluation_id: int) -> ResponseReturnValue:
    session = db_session()
    row = session.execute(queries.evaluation_list(
        Evaluation.id == evaluation_id).add_columns(Jobset.project_id)).first()
    if row is None:
        raise NotFound(f"no evaluation with id {evaluation_id}")
    evaluation_row, project_name, jobset_name, project_id = row
    if not can_see_project(session, current_actor(), project_id):
        raise NotFound(f"no evaluation with id {evaluation_id}")
    counts = loaded_build_counts(session, [evaluation_row]).get(evaluation_id, {})
    groups = queries.group_counts(counts)
    group = request.args.get("status")
    if group not in queries.STATUS_GROUPS:
        # the most useful first: what failed, then what is still to do
        group = next((g for g in ("failed", "running", "queued") if groups[g]), "all")
    # the group's size is in the counts already
    builds = paginate(session, queries.evaluation_builds(evaluation_id, group),
                      BUILDS_PER_PAGE, total=groups[group], scalars=False)
    errors = list(session.scalars(select(EvaluationError).where(
        EvaluationError.evaluation_id == evaluation_id).order_by(EvaluationError.job_name)
        .limit(ERRORS_SHOWN)))
    error_total = len(errors) if len(errors) < ERRORS_SHOWN else int(session.scalar(
        select(func.count()).select_from(EvaluationError).where(
            EvaluationError.evaluation_id == evaluation_id)) or 0)
    previous = queries.previous_evaluation_id(session, evaluation_row)
    comparison, compare_error, other = None, None, None
    raw_other = request.args.get("compare", "")
    if raw_other:
        if not raw_other.isdigit() or len(raw_other) > 18:
            abort(400, "compare= takes an evaluation id")
        other = int(raw_other)
        other_row = session.get(Evaluation, other)
        if other_row is None or not can_see_project(session, current_actor(),
                                                    other_row.jobset.project_id):
            raise NotFound(f"no evaluation with id {other}")
        try:
            comparison = evaluator.compare(session, evaluation_id, other)
        except NotImplementedError:
            compare_error = "Comparing evaluations is not available in this build yet."
    return render_template(
        "evaluation.html", evaluation=evaluation_row, project_name=project_name,
        jobset_name=jobset_name, counts=counts, groups=groups, group=group, builds=builds,
        errors=errors, error_total=error_total, previous=previous, comparison=comparison,
        compare_error=compare_error, other=other, compare_shown=COMPARE_SHOWN,
        can=allowed_actions(session, current_actor(), project_id))


@blueprint.post("/eval/<id:evaluation_id>/cancel")
@page("evaluation")
def cancel_evaluation(evaluation_id: int) -> ResponseReturnValue:
    session = db_session()
    actions.cancel_evaluation(session, current_actor(), evaluation_id)
    session.commit()
    flash(f"Evaluation {evaluation_id} cancelled.", "ok")
    return redirect(url_for("dashboard.evaluation", evaluation_id=evaluation_id))
