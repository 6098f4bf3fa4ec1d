"""The Flask application factory."""

from __future__ import annotations

from flask import Flask
from sqlalchemy import Engine

from circus.common.config import Settings, load_settings
from circus.common.db import make_engine, make_session_factory
from circus.server import cache, counters, errors, health, requestids, usercontent
from circus.server.context import ServerContext, close_db_session


def create_app(settings: Settings | None = None, *, engine: Engine | None = None) -> Flask:
    settings = settings or load_settings()
    app = Flask("circus.server")
    app.config.update(
        SECRET_KEY=settings.server.secret_key or "",
        MAX_CONTENT_LENGTH=settings.server.max_body_size,
        JSON_SORT_KEYS=False,
    )
    engine = engine or make_engine(settings, application_name="circus-server")
    app.extensions["circus"] = ServerContext(settings, engine, make_session_factory(engine))
    # cache hits and bytes served, summed over worker processes for /metrics
    counters.init_app(app, engine)
    app.teardown_appcontext(close_db_session)
    # first: every later hook and view logs with the request's id
    requestids.init_app(app)
    errors.init_app(app)
    app.register_blueprint(health.blueprint)
    # first: its check (which origin serves what) runs before any other before_request
    usercontent.init_app(app, settings)
    # the API and its collaborators (auth, security, metrics, public endpoints)
    from circus.common.celery import create_celery_app
    from circus.server import api, auth, github_login, metrics, public, security, streams

    if settings.broker.url:
        # services enqueue() tasks after commit through it (absent: docs generation)
        app.extensions["celery"] = create_celery_app(settings, name="circus-server",
                                                     engine=engine)
    auth.init_app(app, settings)
    github_login.init_app(app, settings)
    limiter = security.init_app(app, settings)
    api.init_app(app)
    streams.init_app(app, settings)
    app.register_blueprint(public.blueprint)
    metrics.init_app(app)
    # the web pages at / (they call the same services as the API)
    from circus.server import dashboard

    dashboard.init_app(app)
    security.limit_login(app, limiter, settings)
    security.limit_workers(app, limiter, settings)
    # last: its narinfo fast path wraps the finished WSGI app
    cache.init_app(app)
    return app
