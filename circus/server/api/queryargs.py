"""Query arguments a route does not declare are a 400, never silently dropped.

webargs drops undeclared query arguments (its default for the query location), so
``GET /api/v1/builds?project=demo`` (the filter is ``project_id``) answered every build,
and a script that restarted or cancelled "the builds of demo" acted on all of them.

One ``before_request`` hook compares ``request.args`` with what the route declares
through ``@blp.arguments(..., location="query")``, which is also what the OpenAPI
document lists: routes that declare nothing accept nothing. It runs after the app's
own hooks (authentication guards, rate limits), before the view, so a refused request
reads nothing and changes nothing. A view that reads ``request.args`` itself must
declare those arguments in a query schema (it would get none through otherwise).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import marshmallow as ma
from flask import Flask, request

from circus.common.errors import InvalidInput

#: routes left as they were: the live log stream (server-sent events, reconnecting
#: clients); forge webhook deliveries (the forge chooses the URL's arguments)
TOLERANT_ENDPOINTS = frozenset({"build-files.log_stream", "webhooks.receive"})


def declared_query_arguments(view: Callable[..., Any]) -> frozenset[str] | None:
    """The query arguments ``view`` accepts (flask-smorest records its ``@arguments``
    on the view); None when its schema itself lets unknown ones through (``unknown =
    EXCLUDE``: GitHub's login callback, whose arguments GitHub chooses)."""
    documented = getattr(view, "_apidoc", {}).get("arguments", {})
    names: set[str] = set()
    for parameter in documented.get("parameters", []):
        if parameter["in"] != "query":
            continue
        schema = parameter["schema"]
        if isinstance(schema, type):
            schema = schema()
        if schema.unknown != ma.RAISE:
            return None
        names.update(field.data_key or name for name, field in schema.load_fields.items())
    return frozenset(names)


def unknown_arguments_error(unknown: Iterable[str], accepted: frozenset[str]) -> InvalidInput:
    names = sorted(unknown)
    listed = ", ".join(sorted(accepted))
    noun = "argument" if len(names) == 1 else "arguments"
    takes = f"accepted: {listed}" if accepted else "this route takes no query arguments"
    return InvalidInput(f"unknown query {noun}: {', '.join(names)} ({takes})",
                        {"query": {name: ["unknown argument"] for name in names},
                         "accepted": sorted(accepted)})


def init_app(app: Flask, blueprints: Iterable[str]) -> None:
    """Refuse undeclared query arguments on every route of ``blueprints`` (call after
    they are registered: the table is read from their views once)."""
    prefixes = tuple(f"{name}." for name in blueprints)
    accepted: dict[str, frozenset[str]] = {}
    for endpoint, view in app.view_functions.items():
        if not endpoint.startswith(prefixes) or endpoint in TOLERANT_ENDPOINTS:
            continue
        names = declared_query_arguments(view)
        if names is not None:
            accepted[endpoint] = names

    @app.before_request
    def refuse_unknown_query_arguments() -> None:
        names = accepted.get(request.endpoint or "")
        if names is None or not request.args:
            return
        unknown = set(request.args) - names
        if unknown:
            raise unknown_arguments_error(unknown, names)
