"""/api/v1 search, news and metrics time series."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Any

from flask.typing import ResponseReturnValue
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from circus.auth.actor import Actor
from circus.auth.visibility import require_visible
from circus.common.enums import BuildStatus
from circus.common.errors import NotFound
from circus.common.models import (
    Jobset,
    News,
    Project,
)
from circus.common.models.base import utcnow
from circus.server import actions
from circus.server.aggregates import cached
from circus.server.api import queries
from circus.server.api.base import Blueprint, paginate
from circus.server.api.schemas.admin import (
    NewsCreateSchema,
    NewsSchema,
    SearchArgsSchema,
    SearchResultSchema,
    SystemsMetricsSchema,
    TimeseriesArgsSchema,
    TimeseriesSchema,
)
from circus.server.api.schemas.common import PageArgs, page_of
from circus.server.auth import current_actor
from circus.server.context import db_session

blp = Blueprint("misc", __name__, url_prefix="/api/v1",
                description="Search, news and metrics")


@blp.get("/search")
@blp.arguments(SearchArgsSchema, location="query")
@blp.response(200, SearchResultSchema)
def search(args: dict[str, Any]) -> Any:
    """Projects, jobsets, jobs, builds (by id) and store paths matching ``q``."""
    return queries.search(db_session(), current_actor(), args["q"], args["limit"])


# ---------------------------------------------------------------------------
# news


@blp.get("/news")
@blp.arguments(PageArgs, location="query")
@blp.response(200, page_of(NewsSchema))
def list_news(args: dict[str, Any]) -> Any:
    return paginate(db_session(), select(News).order_by(News.id.desc()), args)


@blp.post("/news")
@blp.arguments(NewsCreateSchema)
@blp.response(201, NewsSchema)
def create_news(data: dict[str, Any]) -> Any:
    session = db_session()
    item = actions.create_news(session, current_actor(), title=data["title"],
                               contents=data["contents"])
    session.commit()
    return item


@blp.delete("/news/<id:news_id>")
@blp.response(204)
def delete_news(news_id: int) -> ResponseReturnValue:
    session = db_session()
    actions.delete_news(session, current_actor(), news_id)
    session.commit()
    return ""


# ---------------------------------------------------------------------------
# metrics


@blp.get("/metrics/systems")
@blp.response(200, SystemsMetricsSchema)
def systems() -> Any:
    """Per system: queued, running, succeeded and failed builds, and machines serving it
    (enabled SSH builders, connected agents, queue runners and remote workers with local
    build slots and a fresh heartbeat)."""
    return {"systems": queries.systems_summary(db_session(), current_actor())}


def _series(name: str, args: dict[str, Any], grouped_by_status: bool) -> dict[str, Any]:
    session = db_session()
    actor = current_actor()
    # a filter naming a project or jobset the caller cannot see is a 404, as for one
    # that does not exist (an empty series would tell the two apart)
    if "project_id" in args:
        if session.get(Project, args["project_id"]) is None:
            raise NotFound(f"no project with id {args['project_id']}")
        require_visible(session, actor, args["project_id"],
                        f"project with id {args['project_id']}")
    if "jobset_id" in args:
        jobset = session.get(Jobset, args["jobset_id"])
        if jobset is None:
            raise NotFound(f"no jobset with id {args['jobset_id']}")
        require_visible(session, actor, jobset.project_id, f"jobset with id {jobset.id}")
    return cached(name, args, actor, lambda session: _compute_series(
        session, args, actor, grouped_by_status))


def _compute_series(session: Session, args: dict[str, Any], actor: Actor,
                    grouped_by_status: bool) -> dict[str, Any]:
    """Finished builds (by status) or their average duration per bucket since ``days``
    ago, from the rollup (:func:`queries.completions`)."""
    both = queries.completions(utcnow() - timedelta(days=args["days"]), args, actor)
    bucket = func.date_trunc(args["bucket"], both.c.t)
    query = select(bucket, both.c.status, func.sum(both.c.builds),
                   func.sum(both.c.duration_sum), func.sum(both.c.durations)
                   ).group_by(bucket, both.c.status).order_by(bucket)
    points: dict[Any, dict[str, float]] = {}
    totals: dict[Any, tuple[Decimal, int]] = {}
    for t, status, count, duration_sum, durations in session.execute(query):
        if not count:
            continue
        if grouped_by_status:
            points.setdefault(t, {})[BuildStatus(status).name] = float(count)
        else:
            total_seconds, total = totals.get(t, (Decimal(0), 0))
            totals[t] = (total_seconds + duration_sum, total + durations)
            points[t] = {"avg_seconds": float(totals[t][0] / totals[t][1])
                         if totals[t][1] else 0.0}
    return {"bucket": args["bucket"],
            "series": [{"t": t, "values": values} for t, values in points.items()]}


@blp.get("/metrics/timeseries/builds")
@blp.arguments(TimeseriesArgsSchema, location="query")
@blp.response(200, TimeseriesSchema)
def builds_series(args: dict[str, Any]) -> Any:
    """Finished builds per time bucket, by status."""
    return _series("timeseries.builds", args, grouped_by_status=True)


@blp.get("/metrics/timeseries/duration")
@blp.arguments(TimeseriesArgsSchema, location="query")
@blp.response(200, TimeseriesSchema)
def duration_series(args: dict[str, Any]) -> Any:
    """Average build duration (seconds) per time bucket."""
    return _series("timeseries.duration", args, grouped_by_status=False)
