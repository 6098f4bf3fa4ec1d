"""Every error leaves the server as JSON ``{"error": ..., "details": ...}``."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, jsonify, request
from flask.typing import ResponseReturnValue
from werkzeug.exceptions import HTTPException

from circus.common.errors import CircusError

log = logging.getLogger(__name__)


def error_response(status: int, message: str, details: Any = None) -> ResponseReturnValue:
    return jsonify({"error": message, "details": details}), status


def wants_json() -> bool:
    return (request.path.startswith("/api/") or request.accept_mimetypes.best == "application/json"
            or not request.accept_mimetypes.accept_html)


def init_app(app: Flask) -> None:
    @app.errorhandler(CircusError)
    def circus_error(exc: CircusError) -> ResponseReturnValue:
        return error_response(exc.http_status, exc.message, exc.details)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> ResponseReturnValue:
        if not wants_json():
            return exc
        details = None
        data = getattr(exc, "data", None)
        if isinstance(data, dict):
            # flask-smorest/webargs validation errors: {"messages": {"json": {"field": [...]}}}
            details = data.get("messages") or data.get("errors")
        return error_response(exc.code or 500, exc.description or exc.name, details)

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> ResponseReturnValue:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, "internal server error")
