"""The home page: what happened lately and how busy Circus is."""

from __future__ import annotations

from flask import render_template
from flask.typing import ResponseReturnValue

from circus.server.auth import current_actor
from circus.server.context import db_session
from circus.server.dashboard import queries
from circus.server.dashboard.access import page
from circus.server.dashboard.blueprint import blueprint


@blueprint.get("/")
@page("home")
def home() -> ResponseReturnValue:
    session = db_session()
    actor = current_actor()
    return render_template(
        "home.html",
        running=queries.running_builds(session, 10, actor=actor),
        finished=queries.recent_finished(session, 15, actor=actor),
        evaluations=queries.recent_evaluations(session, 10, actor=actor),
        queue=queries.queue_summary(session, actor),
        machines=queries.machine_summary(session),
        news=queries.latest_news(session, 3),
    )
