"""/api/v1/builds: list, recent, stats, show, actions, steps, relations."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from flask import jsonify
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from circus.auth.actor import Actor
from circus.auth.visibility import only_visible
from circus.common.enums import ACTIVE_STEP_STATES, BuildStatus
from circus.common.errors import NotFound
from circus.common.models import (
    Build,
    BuildConstituent,
    BuildDependency,
    BuildStatusTotal,
    Step,
)
from circus.server.actions import BuildAction, act_on_build
from circus.server.aggregates import cached
from circus.server.api.base import Blueprint, paginate
from circus.server.api.listrows import build_dicts, select_builds
from circus.server.api.queries import (
    build_id_at_offset,
    build_total,
    filter_builds,
    get_build,
    rollup_filters,
)
from circus.server.api.schemas.builds import (
    BuildFilterSchema,
    BuildSchema,
    BuildStatsSchema,
    FailureSchema,
    RecentArgsSchema,
    StatsArgsSchema,
    StepSchema,
)
from circus.server.api.schemas.common import PageArgs, page_of
from circus.server.auth import current_actor
from circus.server.context import db_session, settings
from circus.server.stepgraph import failure, step_graph

blp = Blueprint("builds", __name__, url_prefix="/api/v1/builds",
                description="Builds, their steps, logs and products")

B = "/<id:build_id>"
UNFINISHED = (BuildStatus.pending, BuildStatus.running)


@blp.get("")
@blp.arguments(BuildFilterSchema, location="query")
@blp.response(200, page_of(BuildSchema))
def list_builds(args: dict[str, Any]) -> Any:
    actor = current_actor()
    session = db_session()
    query = filter_builds(select_builds(), args, actor).order_by(Build.id.desc())
    page = paginate(session, query, args, scalars=False, cursor_column=Build.id,
                    total=build_total(session, args, actor),
                    id_at_offset=build_id_at_offset(session, args, actor))
    return jsonify({**page, "items": build_dicts(session, page["items"])})


@blp.get("/recent")
@blp.arguments(RecentArgsSchema, location="query")
@blp.response(200, BuildSchema(many=True))
def recent(args: dict[str, Any]) -> Any:
    """The most recently finished builds."""
    query = filter_builds(select(Build), {**args, "finished": True}, current_actor()).where(
        Build.completed_at.is_not(None)).order_by(Build.completed_at.desc(), Build.id.desc())
    return list(db_session().scalars(query.limit(args["limit"])))


@blp.get("/stats")
@blp.arguments(StatsArgsSchema, location="query")
@blp.response(200, BuildStatsSchema)
def stats(args: dict[str, Any]) -> Any:
    """Builds by status, average duration and active steps (figures up to
    ``server.aggregate_cache_seconds`` old)."""
    actor = current_actor()
    return cached("builds.stats", args, actor, lambda session: _stats(session, args, actor))


def _stats(session: Session, args: dict[str, Any], actor: Actor) -> dict[str, Any]:
    # from the rollup the builds' triggers keep (a few rows per jobset), not the builds
    rows = session.execute(only_visible(
        select(BuildStatusTotal.status, func.sum(BuildStatusTotal.builds),
               func.sum(BuildStatusTotal.duration_sum), func.sum(BuildStatusTotal.durations))
        .group_by(BuildStatusTotal.status), BuildStatusTotal.project_id, actor)
        .where(*rollup_filters(BuildStatusTotal, args)))
    by_status: dict[str, int] = {}
    seconds, durations = Decimal(0), 0
    for status, count, duration_sum, duration_count in rows:
        if count:
            by_status[status.name] = int(count)
        seconds += duration_sum or 0
        durations += duration_count or 0
    steps = {state.value: count for state, count in session.execute(
        select(Step.state, func.count()).where(Step.state.in_(ACTIVE_STEP_STATES))
        .group_by(Step.state))}
    total = sum(by_status.values())
    pending = by_status.get("pending", 0)
    running = by_status.get("running", 0)
    succeeded = by_status.get("succeeded", 0)
    return {"total": total, "by_status": by_status, "queued": pending, "running": running,
            "finished": total - pending - running, "succeeded": succeeded,
            "failed": total - pending - running - succeeded,
            "avg_duration_seconds": float(seconds / durations) if durations else None,
            "steps_by_state": steps}


@blp.get(B)
@blp.response(200, BuildSchema)
def get_build_view(build_id: int) -> Any:
    return get_build(db_session(), build_id, current_actor())


def _act(build_id: int, action: BuildAction) -> Build:
    session = db_session()
    build = act_on_build(session, current_actor(), build_id, action)
    session.commit()
    return build


@blp.post(B + "/cancel")
@blp.response(200, BuildSchema)
def cancel(build_id: int) -> Any:
    return _act(build_id, BuildAction.cancel)


@blp.post(B + "/restart")
@blp.response(200, BuildSchema)
def restart(build_id: int) -> Any:
    return _act(build_id, BuildAction.restart)


@blp.post(B + "/bump")
@blp.response(200, BuildSchema)
def bump(build_id: int) -> Any:
    return _act(build_id, BuildAction.bump)


@blp.put(B + "/keep/<any(true,false):keep>")
@blp.response(200, BuildSchema)
def keep(build_id: int, keep: str) -> Any:
    return _act(build_id, BuildAction.keep if keep == "true" else BuildAction.unkeep)


# ---------------------------------------------------------------------------
# steps and relations


@blp.get(B + "/steps")
@blp.response(200, StepSchema(many=True))
def steps(build_id: int) -> Any:
    """Every step the build waited for; ``depends_on`` gives the edges of the step graph."""
    session = db_session()
    get_build(session, build_id, current_actor())
    graph = step_graph(session, build_id)
    return [{**vars(step), "depends_on": graph.depends_on[step.step_id]}
            for step in graph.steps]


@blp.get(B + "/steps/failure")
@blp.response(200, FailureSchema)
def step_failure(build_id: int) -> Any:
    """Why the build's latest attempt failed: the path of steps from its own step down to
    the step that failed, that step's machine and the end of its log. 404 when the build's
    own step did not fail."""
    session = db_session()
    get_build(session, build_id, current_actor())
    found = failure(step_graph(session, build_id), settings().logs.log_dir)
    if found is None:
        raise NotFound(f"build {build_id} has no failed step")
    return found


def _related(build_id: int, args: dict[str, Any], query: Any) -> Any:
    session = db_session()
    get_build(session, build_id, current_actor())
    return paginate(session, select(Build).where(Build.id.in_(query)).order_by(Build.id), args)


@blp.get(B + "/constituents")
@blp.arguments(PageArgs, location="query")
@blp.response(200, page_of(BuildSchema))
def constituents(args: dict[str, Any], build_id: int) -> Any:
    """Builds an aggregate job consists of."""
    return _related(build_id, args, select(BuildConstituent.constituent_id).where(
        BuildConstituent.aggregate_id == build_id))


@blp.get(B + "/dependencies")
@blp.arguments(PageArgs, location="query")
@blp.response(200, page_of(BuildSchema))
def dependencies(args: dict[str, Any], build_id: int) -> Any:
    """Builds of the same evaluation whose outputs this build needs."""
    return _related(build_id, args, select(BuildDependency.dependency_id).where(
        BuildDependency.build_id == build_id))


@blp.get(B + "/dependents")
@blp.arguments(PageArgs, location="query")
@blp.response(200, page_of(BuildSchema))
def dependents(args: dict[str, Any], build_id: int) -> Any:
    """Builds that need this build's outputs."""
    return _related(build_id, args, select(BuildDependency.build_id).where(
        BuildDependency.dependency_id == build_id))
