"""The queue, the machines, build metrics, search and news."""

from __future__ import annotations

from datetime import timedelta

from flask import flash, redirect, render_template, url_for
from flask.typing import ResponseReturnValue
from sqlalchemy import select

from circus.auth.permissions import Action, allowed_actions
from circus.common.enums import StepState
from circus.common.errors import CircusError
from circus.common.models import Jobset, News, Project
from circus.common.models.base import utcnow
from circus.server import actions
from circus.server.api.queries import search as search_query
from circus.server.api.queries import systems_summary
from circus.server.auth import current_actor
from circus.server.context import db_session
from circus.server.dashboard import queries
from circus.server.dashboard.access import page
from circus.server.dashboard.blueprint import blueprint
from circus.server.dashboard.forms import Form, query_text
from circus.server.dashboard.pagination import paginate

STEPS_SHOWN = 100


@blueprint.get("/queue")
@page("queue")
def queue() -> ResponseReturnValue:
    session = db_session()
    actor = current_actor()
    return render_template(
        "queue.html", classes=queries.queue_classes(session),
        systems=queries.pending_builds_by_system(session, actor),
        running=queries.steps_list(session, StepState.running, STEPS_SHOWN, actor),
        runnable=queries.steps_list(session, StepState.queued, STEPS_SHOWN, actor),
        summary=queries.queue_summary(session, actor))


@blueprint.get("/machines")
@page("machines")
def machines() -> ResponseReturnValue:
    session = db_session()
    return render_template(
        "machines.html", daemons=queries.daemons(session),
        builders=queries.remote_builders(session),
        agents=queries.agent_sessions(session, 200),
        running=queries.running_by_machine(session), now=utcnow())


@blueprint.get("/stats")
@page("metrics")
def metrics() -> ResponseReturnValue:
    session = db_session()
    actor = current_actor()
    days = queries.daily_finished(session, 14, actor)
    return render_template(
        "metrics.html", totals=queries.status_totals(session, actor),
        systems=systems_summary(session, actor), days=days,
        peak=max(max((ok + failed for _, ok, failed in days), default=0), 1),
        average=queries.average_duration(session, utcnow() - timedelta(days=7), actor))


@blueprint.get("/search")
@page("search")
def search() -> ResponseReturnValue:
    q = query_text("q")
    if not q:
        return render_template("search.html", q=q, results=None, projects={}, jobsets={})
    session = db_session()
    results = search_query(session, current_actor(), q, 50)
    kinds = ("projects", "jobsets", "jobs", "builds")
    project_ids = {r["project_id"] for kind in kinds for r in results[kind]}
    projects = dict(session.execute(select(Project.id, Project.name).where(
        Project.id.in_(project_ids))).tuples().all()) if project_ids else {}
    jobset_ids = {r["jobset_id"] for kind in ("jobsets", "jobs", "builds")
                  for r in results[kind]}
    jobsets = dict(session.execute(select(Jobset.id, Jobset.name).where(
        Jobset.id.in_(jobset_ids))).tuples().all()) if jobset_ids else {}
    return render_template("search.html", q=q, results=results,
                           projects=projects,
                           jobsets=jobsets)


# ---------------------------------------------------------------------------
# news


@blueprint.get("/news")
@page("news")
def news() -> ResponseReturnValue:
    return _news_page(Form())


def _news_page(form: Form) -> ResponseReturnValue:
    session = db_session()
    items = paginate(session, select(News).order_by(News.id.desc()), 20)
    return render_template(
        "news.html", items=items, form=form,
        can_manage=Action.news_manage in allowed_actions(session, current_actor())
    ), form.status


@blueprint.post("/news")
@page("news")
def create_news() -> ResponseReturnValue:
    form = Form.posted("title", "contents")
    form.require("contents")
    if len(form.get("title")) > 256:
        form.add("title", "at most 256 characters")
    if form.ok:
        session = db_session()
        try:
            actions.create_news(session, current_actor(), title=form.get("title"),
                                contents=form.get("contents"))
            session.commit()
        except CircusError as exc:
            session.rollback()
            form.fail(exc)
        else:
            flash("News posted.", "ok")
            return redirect(url_for("dashboard.news"))
    return _news_page(form)


@blueprint.post("/news/<id:news_id>/delete")
@page("news")
def delete_news(news_id: int) -> ResponseReturnValue:
    session = db_session()
    actions.delete_news(session, current_actor(), news_id)
    session.commit()
    flash("News item deleted.", "ok")
    return redirect(url_for("dashboard.news"))
