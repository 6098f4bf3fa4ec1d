"""The REST API under /api/v1 (flask-smorest) and its OpenAPI document."""

from __future__ import annotations

from typing import Any

from flask import Flask
from flask_smorest import Api

from circus import __version__
from circus.common.counting import EXACT_UP_TO, TRUSTED_BEYOND
from circus.server.api import (
    admin,
    buildfiles,
    builds,
    channels,
    evaluations,
    misc,
    projects,
    queryargs,
    users,
    webhooks,
    workers,
)
from circus.server.api.base import IdConverter, NameConverter, id_schema, name_schema
from circus.server.api.schemas.common import ErrorSchema
from circus.server.api.schemas.users import LoginSchema

BLUEPRINTS = (projects.blp, evaluations.blp, builds.blp, buildfiles.blp, channels.blp,
              users.blp, admin.blp, misc.blp, webhooks.blp, workers.blp)


class CircusApi(Api):  # type: ignore[misc]
    ERROR_SCHEMA = ErrorSchema

    def _register_error_handlers(self) -> None:
        # circus.server.errors renders every error as {"error", "details"} already
        pass


def spec_options() -> dict[str, Any]:
    return {
        "info": {"description": "Circus REST API. Authenticate with `Authorization: Bearer "
                                "<api key>` (or a session cookie plus `X-CSRFToken` for "
                                "mutations). Lists answer `{items, total, total_exact, "
                                f"limit, offset}}`: `total` is exact up to {EXACT_UP_TO:,} "
                                "items and the database's estimate beyond (`total_exact` "
                                "false), taken without counting when it is above "
                                f"{EXACT_UP_TO * TRUSTED_BEYOND:,}; builds filtered by "
                                "nothing but project, jobset, system, status or finished, "
                                "or by an evaluation (and status or finished), have an "
                                "exact total at any size, kept by the database. "
                                "Lists ordered by id also answer `next_cursor`, to pass as "
                                "`cursor` (as fast on the last page as on the first, unlike "
                                "`offset`, which is walked: deep offsets cost more, except "
                                "on the builds of all projects or of one). "
                                "Errors answer `{error, details}`. A query argument the "
                                "route does not list is a 400 naming it and the accepted "
                                "ones (never ignored)."},
        "components": {"securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer",
                       "description": "an API key created with POST /api/v1/api-keys"},
            "session": {"type": "apiKey", "in": "cookie", "name": "circus_session"},
            "worker": {"type": "http", "scheme": "bearer",
                       "description": "a remote worker token (remote_workers.auth_tokens), "
                                      "with the worker's name in X-Circus-Worker"},
        }},
        "security": [{"bearer": []}, {"session": []}],
    }


def init_app(app: Flask) -> CircusApi:
    app.config.update(
        API_TITLE="Circus",
        API_VERSION=__version__,
        OPENAPI_VERSION="3.0.3",
        OPENAPI_URL_PREFIX="/api/v1",
        OPENAPI_JSON_PATH="openapi.json",
        API_SPEC_OPTIONS=spec_options(),
    )
    app.url_map.converters["id"] = IdConverter
    app.url_map.converters["name"] = NameConverter
    app.url_map.converters["forge"] = webhooks.ForgeConverter
    api = CircusApi(app)
    api.register_converter(IdConverter, id_schema)
    api.register_converter(NameConverter, name_schema)
    api.register_converter(webhooks.ForgeConverter, webhooks.forge_schema)
    # request bodies documented by hand (the login form) reference it by name
    api.spec.components.schema("Login", schema=LoginSchema)
    for blp in BLUEPRINTS:
        api.register_blueprint(blp)
    queryargs.init_app(app, [blp.name for blp in BLUEPRINTS])
    return api
