"""/api/v1 search, news and metrics time series."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from flask.typing import ResponseReturnValue
from sqlalchemy import Float, cast, func, or_, select

from circus import audit
from circus.auth.permissions import Action, require_permission
from circus.common.enums import BuildStatus
from circus.common.errors import NotFound
from circus.common.models import (
    Build,
    BuilderSession,
    BuildOutput,
    Jobset,
    News,
    Project,
    RemoteBuilder,
)
from circus.common.models.base import utcnow
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
    session = db_session()
    q, limit = args["q"].strip(), args["limit"]
    projects = session.scalars(select(Project).where(or_(
        Project.name.icontains(q, autoescape=True),
        Project.description.icontains(q, autoescape=True))).order_by(Project.name).limit(limit))
    jobsets = session.scalars(select(Jobset).where(Jobset.name.icontains(q, autoescape=True))
                              .order_by(Jobset.name).limit(limit))
    jobs = session.execute(
        select(Build.jobset_id, Build.job_name, func.max(Build.id), func.min(Build.project_id))
        .where(Build.job_name.icontains(q, autoescape=True))
        .group_by(Build.jobset_id, Build.job_name).order_by(Build.job_name).limit(limit))
    builds: list[dict[str, Any]] = []
    if q.isdigit() and len(q) < 19:
        build = session.get(Build, int(q))
        if build is not None:
            builds.append(_build_hit(build))
    if q.startswith("/nix/store/") or len(q) >= 8:
        builds += [_build_hit(b) for b in session.scalars(
            select(Build).where(Build.drv_path.startswith(q if q.startswith("/") else
                                                          f"/nix/store/{q}", autoescape=True))
            .order_by(Build.id.desc()).limit(limit))]
    paths: Any = session.execute(
        select(BuildOutput.path, BuildOutput.build_id).where(
            BuildOutput.path.startswith(q if q.startswith("/") else f"/nix/store/{q}",
                                        autoescape=True))
        .order_by(BuildOutput.build_id.desc()).limit(limit)) if len(q) >= 3 else []
    return {
        "query": q,
        "projects": [{"kind": "project", "id": p.id, "name": p.name, "project_id": p.id}
                     for p in projects],
        "jobsets": [{"kind": "jobset", "id": j.id, "name": j.name, "project_id": j.project_id,
                     "jobset_id": j.id} for j in jobsets],
        "jobs": [{"kind": "job", "id": None, "name": name, "jobset_id": jobset_id,
                  "project_id": project_id, "build_id": build_id}
                 for jobset_id, name, build_id, project_id in jobs],
        "builds": builds[:limit],
        "store_paths": [{"kind": "store_path", "id": None, "name": path, "build_id": build_id}
                        for path, build_id in paths],
    }


def _build_hit(build: Build) -> dict[str, Any]:
    return {"kind": "build", "id": build.id, "name": build.job_name, "build_id": build.id,
            "project_id": build.project_id, "jobset_id": build.jobset_id}


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
    actor = current_actor()
    require_permission(session, actor, Action.news_manage)
    item = News(title=data["title"], contents=data["contents"], author_id=actor.user_id)
    session.add(item)
    session.flush()
    audit.record(session, actor, "news.create", f"news:{item.id}", {"title": item.title})
    session.commit()
    return item


@blp.delete("/news/<id:news_id>")
@blp.response(204)
def delete_news(news_id: int) -> ResponseReturnValue:
    session = db_session()
    actor = current_actor()
    require_permission(session, actor, Action.news_manage)
    item = session.get(News, news_id)
    if item is None:
        raise NotFound(f"no news item {news_id}")
    session.delete(item)
    audit.record(session, actor, "news.delete", f"news:{news_id}")
    session.commit()
    return ""


# ---------------------------------------------------------------------------
# metrics


@blp.get("/metrics/systems")
@blp.response(200, SystemsMetricsSchema)
def systems() -> Any:
    """Per system: queued, running, succeeded and failed builds, and machines serving it."""
    session = db_session()
    rows = session.execute(select(Build.system, Build.status, func.count())
                           .group_by(Build.system, Build.status))
    table: dict[str, dict[str, int]] = {}
    for system, status, count in rows:
        entry = table.setdefault(system, {"pending": 0, "running": 0, "succeeded": 0,
                                          "failed": 0, "machines": 0})
        if status in (BuildStatus.pending, BuildStatus.running, BuildStatus.succeeded):
            entry[status.name] += count
        else:
            entry["failed"] += count
    machines: list[list[str]] = [list(s) for s in session.scalars(
        select(RemoteBuilder.systems).where(RemoteBuilder.enabled.is_(True)))]
    machines += [list(s) for s in session.scalars(
        select(BuilderSession.systems).where(BuilderSession.connected.is_(True)))]
    for systems_of_machine in machines:
        for system in systems_of_machine:
            table.setdefault(system, {"pending": 0, "running": 0, "succeeded": 0, "failed": 0,
                                      "machines": 0})["machines"] += 1
    return {"systems": [{"system": s, **v} for s, v in sorted(table.items())]}


def _series(args: dict[str, Any], value: Any, grouped_by_status: bool) -> dict[str, Any]:
    session = db_session()
    since = utcnow() - timedelta(days=args["days"])
    bucket = func.date_trunc(args["bucket"], Build.completed_at)
    columns = [bucket, Build.status, value] if grouped_by_status else [bucket, value]
    query = select(*columns).where(Build.completed_at >= since)
    if "project_id" in args:
        query = query.where(Build.project_id == args["project_id"])
    if "jobset_id" in args:
        query = query.where(Build.jobset_id == args["jobset_id"])
    query = query.group_by(*columns[:-1]).order_by(bucket)
    points: dict[Any, dict[str, float]] = {}
    for row in session.execute(query):
        if grouped_by_status:
            t, status, v = row
            points.setdefault(t, {})[status.name] = float(v)
        else:
            t, v = row
            points.setdefault(t, {})["avg_seconds"] = float(v or 0)
    return {"bucket": args["bucket"],
            "series": [{"t": t, "values": values} for t, values in points.items()]}


@blp.get("/metrics/timeseries/builds")
@blp.arguments(TimeseriesArgsSchema, location="query")
@blp.response(200, TimeseriesSchema)
def builds_series(args: dict[str, Any]) -> Any:
    """Finished builds per time bucket, by status."""
    return _series(args, func.count(), grouped_by_status=True)


@blp.get("/metrics/timeseries/duration")
@blp.arguments(TimeseriesArgsSchema, location="query")
@blp.response(200, TimeseriesSchema)
def duration_series(args: dict[str, Any]) -> Any:
    """Average build duration (seconds) per time bucket."""
    seconds = func.avg(cast(func.extract("epoch", Build.completed_at - Build.started_at), Float))
    return _series(args, seconds, grouped_by_status=False)
