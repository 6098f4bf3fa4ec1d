"""Every error leaves the server as JSON ``{"error": ..., "details": ...}``."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, jsonify, request
from flask.typing import ResponseReturnValue
from sqlalchemy.exc import DataError, IntegrityError
from werkzeug.exceptions import HTTPException

from circus.common.errors import CircusError

log = logging.getLogger(__name__)


def error_response(status: int, message: str, details: Any = None) -> ResponseReturnValue:
    return jsonify({"error": message, "details": details}), status


def wants_json() -> bool:
    return (request.path.startswith("/api/") or request.accept_mimetypes.best == "application/json"
            or not request.accept_mimetypes.accept_html)


def validation_summary(messages: dict[str, Any]) -> str:
    """``field: reason; other: reason`` from webargs' ``{location: {field: [reasons]}}``."""
    parts = []
    for location in messages.values():
        if not isinstance(location, dict):
            continue
        for field, reasons in location.items():
            text = reasons if isinstance(reasons, str) else "; ".join(
                str(r) for r in (reasons if isinstance(reasons, list) else [reasons]))
            parts.append(f"{field}: {text}")
    return ", ".join(parts) or "validation failed"


def init_app(app: Flask) -> None:
    @app.errorhandler(CircusError)
    def circus_error(exc: CircusError) -> ResponseReturnValue:
        headers = {"WWW-Authenticate": 'Bearer realm="circus"'} if exc.http_status == 401 \
            else {}
        return jsonify({"error": exc.message, "details": exc.details}), exc.http_status, headers

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> ResponseReturnValue:
        if not wants_json():
            return exc
        details = None
        message = exc.description or exc.name
        data = getattr(exc, "data", None)
        if isinstance(data, dict):
            # flask-smorest/webargs validation errors: {"messages": {"json": {"field": [...]}}}
            details = data.get("messages") or data.get("errors")
            if isinstance(details, dict) and data.get("messages"):
                message = "invalid input: " + validation_summary(details)
        # keep Retry-After (rate limits) and Allow (wrong method)
        headers = {k: v for k, v in exc.get_headers() if k in ("Retry-After", "Allow")}
        return jsonify({"error": message, "details": details}), exc.code or 500, headers

    @app.errorhandler(DataError)
    def data_error(exc: DataError) -> ResponseReturnValue:
        # a value the database rejects (out of range, malformed): the client's fault
        return error_response(400, "invalid value", str(exc.orig).splitlines()[0])

    @app.errorhandler(IntegrityError)
    def integrity_error(exc: IntegrityError) -> ResponseReturnValue:
        # a concurrent twin won a uniqueness race, or a referenced row just vanished
        return error_response(409, "conflict with existing data",
                              str(exc.orig).splitlines()[0])

    @app.errorhandler(ValueError)
    def value_error(exc: ValueError) -> ResponseReturnValue:
        if "NUL" in str(exc):
            # psycopg2 refuses NUL in strings: input that slipped past validation
            return error_response(400, "invalid value: NUL characters are not allowed")
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, "internal server error")

    @app.errorhandler(NotImplementedError)
    def not_implemented(exc: NotImplementedError) -> ResponseReturnValue:
        return error_response(501, "not implemented in this build", str(exc) or None)

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> ResponseReturnValue:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, "internal server error")
