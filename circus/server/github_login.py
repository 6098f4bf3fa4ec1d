"""The GitHub login flow in the web tier (authlib's Flask client).

``start`` redirects to GitHub's authorize page with a random ``state`` that
authlib keeps in this browser's signed session cookie, together with where to
go afterwards; ``finish`` (the callback) accepts only a ``state`` this browser
was given, exchanges the code for a token, reads the user from GitHub's API and
logs them in through the one external-login path (:func:`external_login`).
"""

from __future__ import annotations

from typing import Any

import requests
from authlib.integrations.base_client.errors import MismatchingStateError, OAuthError
from authlib.integrations.flask_client import OAuth
from flask import Flask, current_app, redirect, request, session, url_for
from flask.typing import ResponseReturnValue

from circus.auth import github
from circus.common.config import Settings
from circus.common.errors import (
    CircusError,
    InvalidInput,
    NotFound,
    Unauthenticated,
    Unavailable,
)
from circus.common.models import User
from circus.server.auth import external_login, record_failed_login
from circus.server.context import settings
from circus.server.dashboard.access import safe_next

EXTENSION = "circus.github_login"


def init_app(app: Flask, config: Settings) -> None:
    if config.oauth.github.enabled:
        registry = OAuth(app)
        github.register_client(registry, config.oauth.github)
        app.extensions[EXTENSION] = registry


def _client() -> Any:
    registry: OAuth | None = current_app.extensions.get(EXTENSION)
    if registry is None:
        raise NotFound("GitHub login is not enabled on this server",
                       {"hint": "set oauth.github.enabled, client_id and client_secret"})
    return registry.create_client(github.CLIENT_NAME)


def start(target: str | None) -> ResponseReturnValue:
    """Redirect to GitHub's authorize page; ``target`` is where to land afterwards."""
    client = _client()
    redirect_uri = callback_url()
    found = client.create_authorization_url(redirect_uri)
    # the return URL is kept with the state: two logins in two tabs do not mix them up
    client.save_authorize_data(redirect_uri=redirect_uri, next=safe_next(target), **found)
    return redirect(found["url"])


def callback_url() -> str:
    """The callback's absolute URL: under ``server.base_url`` when set (behind a
    TLS-terminating proxy the request's own URL would say ``http://<backend>``, which
    GitHub refuses as not the registered callback)."""
    base = settings().server.base_url
    if base:
        return base.rstrip("/") + url_for("users.github_callback")
    return url_for("users.github_callback", _external=True)


def pending_target() -> str:
    """Where the login of this callback's ``state`` wanted to land ("/" when unknown)."""
    registry: OAuth | None = current_app.extensions.get(EXTENSION)
    state = request.args.get("state")
    if registry is None or not state:
        return "/"
    data = registry.create_client(github.CLIENT_NAME).framework.get_state_data(session, state)
    return safe_next(data.get("next") if isinstance(data, dict) else None)


def finish() -> User:
    """Complete the login from GitHub's redirect; every failure is a Circus error."""
    client = _client()
    try:
        token = client.authorize_access_token()
    except MismatchingStateError as exc:
        raise _failed(InvalidInput(
            "this login was not started in this browser, or it expired (state mismatch)",
            {"hint": "start again from the login page"})) from exc
    except OAuthError as exc:
        if exc.error == "access_denied":
            raise _failed(Unauthenticated("the GitHub login was cancelled or denied")) from exc
        raise _failed(Unauthenticated(f"GitHub refused the login: {exc.error}",
                                      {"description": exc.description})) from exc
    except (requests.RequestException, ValueError) as exc:
        # unreachable token endpoint, or an answer that is not JSON
        raise _failed(Unavailable("GitHub cannot be reached to finish the login",
                                  {"reason": str(exc)[:300]})) from exc
    access_token = token.get("access_token") if isinstance(token, dict) else None
    if not isinstance(access_token, str) or not access_token:
        raise _failed(Unauthenticated("GitHub answered without an access token"))
    config = settings().oauth.github
    try:
        identity = github.fetch_identity(config.api_url, access_token)
        if config.allowed_organizations:
            github.require_organization(config.api_url, access_token,
                                        config.allowed_organizations, identity.username)
    except CircusError as exc:
        raise _failed(exc) from exc
    return external_login(identity, config.default_role)


def _failed(error: CircusError) -> CircusError:
    record_failed_login(None, "github", error.message)
    return error
