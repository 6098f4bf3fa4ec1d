"""Request ids: every request gets one (the client's ``X-Request-ID`` if it is safe to
log), every log line written while serving it carries it, and the response names it.
One access log line per request ends it."""

from __future__ import annotations

import logging
import time

from flask import Flask, Response, g, request

from circus.common import logcontext

access_log = logging.getLogger("circus.server.access")


def init_app(app: Flask) -> None:
    @app.before_request
    def open_request() -> None:
        g.request_id = logcontext.request_id_from(request.headers.get("X-Request-ID"))
        g.request_started = time.monotonic()
        g.log_context = logcontext.push(request_id=g.request_id)

    @app.after_request
    def name_request(response: Response) -> Response:
        request_id = g.get("request_id")
        if request_id:
            response.headers["X-Request-ID"] = request_id
            access_log.info("%s %s %s %.1f ms", request.method, request.path,
                            response.status_code,
                            (time.monotonic() - g.request_started) * 1000)
        return response

    @app.teardown_request
    def close_request(exc: BaseException | None) -> None:
        token = g.pop("log_context", None)
        if token is not None:
            logcontext.pop(token)

