"""Errors inside the dashboard become pages (the API keeps its JSON errors)."""

from __future__ import annotations

import logging

from flask import redirect, render_template, url_for
from flask.typing import ResponseReturnValue
from flask_wtf.csrf import CSRFError
from sqlalchemy.exc import DataError, IntegrityError
from werkzeug.exceptions import HTTPException

from circus.common.errors import CircusError, Unauthenticated
from circus.server.auth import bearer_token
from circus.server.context import db_session
from circus.server.dashboard.access import LoginRequired, return_url
from circus.server.dashboard.blueprint import blueprint

log = logging.getLogger(__name__)


def error_page(status: int, title: str, message: str) -> ResponseReturnValue:
    # a failed statement leaves the transaction unusable for the layout's own reads
    db_session().rollback()
    return render_template("error.html", status=status, title=title, message=message), status


@blueprint.errorhandler(LoginRequired)
@blueprint.errorhandler(Unauthenticated)
def login_required(exc: Exception) -> ResponseReturnValue:
    if isinstance(exc, Unauthenticated) and bearer_token() is not None:
        # a script's key was refused: the login page would hide why, and it refuses the
        # same header again (every page, /login included, redirected in a loop)
        return error_page(401, "Not authenticated", exc.message)
    return redirect(url_for("dashboard.login", next=return_url()))


@blueprint.errorhandler(CircusError)
def circus_error(exc: CircusError) -> ResponseReturnValue:
    titles = {403: "Not allowed", 404: "Not found", 409: "Conflict", 400: "Invalid request",
              503: "Unavailable"}
    return error_page(exc.http_status, titles.get(exc.http_status, "Error"), exc.message)


@blueprint.errorhandler(CSRFError)
def csrf_error(exc: CSRFError) -> ResponseReturnValue:
    return error_page(400, "Form expired",
                      "The form's security token is missing or stale. Go back, reload the "
                      "page and submit again.")


@blueprint.errorhandler(HTTPException)
def http_error(exc: HTTPException) -> ResponseReturnValue:
    page = error_page(exc.code or 500, exc.name, exc.description or exc.name)
    # a 429 (live log streams) says when to come back
    retry = [(k, v) for k, v in exc.get_headers() if k == "Retry-After"]
    return (*page, retry) if retry and isinstance(page, tuple) else page


@blueprint.errorhandler(DataError)
def data_error(exc: DataError) -> ResponseReturnValue:
    return error_page(400, "Invalid value", str(exc.orig).splitlines()[0])


@blueprint.errorhandler(IntegrityError)
def integrity_error(exc: IntegrityError) -> ResponseReturnValue:
    return error_page(409, "Conflict", "the change conflicts with existing data; reload and "
                                       "try again")


@blueprint.errorhandler(NotImplementedError)
def not_implemented(exc: NotImplementedError) -> ResponseReturnValue:
    return error_page(501, "Not available",
                      "This action is not available in this build of Circus yet.")


@blueprint.errorhandler(Exception)
def unexpected(exc: Exception) -> ResponseReturnValue:
    if isinstance(exc, ValueError) and "NUL" in str(exc):
        # psycopg2 refuses NUL in strings: input that slipped past validation
        return error_page(400, "Invalid value", "NUL characters are not allowed")
    log.exception("unhandled error in the dashboard")
    return error_page(500, "Internal error", "Something went wrong on our side; it was logged.")
