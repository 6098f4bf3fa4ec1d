"""What circus-server's gunicorn master prepares once for every worker it forks.

Workers fork from the master holding the finished app, so work done there before
the fork is shared (copy-on-write) instead of repeated by each worker on its first
request of each kind: compiling a dashboard page's templates took 10-30 ms of that
first request per worker (`bench/api_profile.py`'s "first" column), which at the
default 80 requests per route of `bench/api_scale.py` was the route's p99.
"""

from __future__ import annotations

import logging

from flask import Flask
from sqlalchemy import Engine, text
from sqlalchemy.orm import configure_mappers

log = logging.getLogger(__name__)


def warm_up(app: Flask) -> None:
    """Configure the ORM's mappers and compile every template (in the master)."""
    configure_mappers()
    environment = app.jinja_env
    for name in environment.list_templates(filter_func=_is_template):
        environment.get_template(name)


def _is_template(name: str) -> bool:
    return name.endswith((".html", ".xml", ".txt"))


def open_first_connection(engine: Engine) -> None:
    """Open a worker's first pooled connection before its first request needs it.

    Best effort: a database that is not up yet is the request's problem (and /health's),
    not a reason for the worker to fail its boot."""
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception as exc:  # any failure leaves the pool empty, as without this
        log.info("no database connection opened ahead of the first request: %s", exc)
