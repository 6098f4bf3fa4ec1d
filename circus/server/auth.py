"""Authentication in the web tier: who is calling, sessions, CSRF.

- ``Authorization: Bearer <key>``: an API key (looked up on every request, so a
  revoked key stops working at once); exempt from CSRF (browsers never attach it).
- A session cookie (Flask's signed cookie) holding a random login token whose
  SHA-256 is in ``user_sessions``; flask-login loads the user from it. Mutations
  made with a session need a CSRF token (``X-CSRFToken`` header or
  ``csrf_token`` form field).
- Otherwise anonymous.

The dashboard reuses :func:`current_actor`, :func:`log_in`, :func:`log_out`.
"""

from __future__ import annotations

from datetime import timedelta

from flask import Flask, g, request, session
from flask_login import LoginManager, UserMixin, current_user, login_user, logout_user
from flask_wtf.csrf import CSRFProtect, generate_csrf

from circus.auth import api_keys
from circus.auth.actor import Actor
from circus.auth.external import ExternalIdentity
from circus.auth.permissions import require_writable
from circus.auth.sessions import create_session, end_session, load_session
from circus.common.config import Settings
from circus.common.enums import ActorKind, Role
from circus.common.errors import CircusError, NotFound, Unauthenticated
from circus.common.models import User
from circus.server.context import db_session, settings
from circus.server.security import client_address

csrf = CSRFProtect()
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data", "text/plain")
#: readable without credentials even when ``require_api_key_for_reads`` is on
PUBLIC_API_PATHS = frozenset({"/api/v1/openapi.json", "/api/v1/auth/csrf",
                              # the GitHub login flow: whoever is not logged in yet
                              "/api/v1/auth/github", "/api/v1/auth/github/callback"})
#: POSTs that authenticate themselves (forge webhooks: HMAC signature or GitLab's token)
#: and that forges send cross-site, possibly form-encoded: no CSRF token can exist
SELF_AUTHENTICATED_ENDPOINTS = frozenset({"webhooks.receive"})
#: blueprints whose bearer token is not an API key: remote build workers present a
#: worker token (``remote_workers.auth_tokens``), checked by the service itself
SELF_AUTHENTICATED_BLUEPRINTS = frozenset({"workers"})


class SessionUser(UserMixin):  # type: ignore[misc]
    """flask-login's view of a login: ``get_id`` is the session token, not the user id."""

    def __init__(self, user: User, token: str) -> None:
        self.user = user
        self.token = token

    def get_id(self) -> str:
        return self.token


def init_app(app: Flask, config: Settings) -> None:
    app.config.update(
        SESSION_COOKIE_NAME="circus_session",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=config.server.force_secure_cookies,
        PERMANENT_SESSION_LIFETIME=timedelta(hours=config.server.session_lifetime_hours),
        REMEMBER_COOKIE_HTTPONLY=True,
        REMEMBER_COOKIE_SECURE=config.server.force_secure_cookies,
        # checked by _csrf_guard only where it matters (not for bearer-token calls)
        WTF_CSRF_CHECK_DEFAULT=False,
        WTF_CSRF_TIME_LIMIT=None,
        WTF_CSRF_SSL_STRICT=config.server.force_secure_cookies,
    )
    manager = LoginManager(app)
    manager.session_protection = None

    @manager.user_loader  # type: ignore[untyped-decorator]
    def load_user(token: str) -> SessionUser | None:
        found = load_session(db_session(), token)
        if found is None:
            return None
        return SessionUser(found[1], token)

    csrf.init_app(app)
    app.before_request(_csrf_guard)
    app.before_request(_read_guard)
    app.before_request(_write_guard)


def bearer_token() -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


def current_actor() -> Actor:
    """The caller of this request (cached per request)."""
    actor: Actor | None = g.get("_circus_actor")
    if actor is not None:
        return actor
    remote = client_address()
    token = bearer_token()
    if token is not None:
        found = api_keys.authenticate(db_session(), token, remote)
        if found is None:
            raise Unauthenticated("invalid or revoked API key")
        actor = found
    elif current_user.is_authenticated:
        user: User = current_user.user
        actor = Actor(ActorKind.user, name=user.username, role=user.role, user_id=user.id,
                      remote_addr=remote)
    else:
        actor = Actor.anonymous(remote)
    g._circus_actor = actor
    return actor


def log_in(user: User) -> str:
    """Start a session for ``user`` in this response's cookie; returns a CSRF token."""
    token = create_session(db_session(), user, remote_addr=client_address(),
                           lifetime=timedelta(hours=settings().server.session_lifetime_hours))
    db_session().commit()
    session.clear()
    session.permanent = True
    login_user(SessionUser(user, token))
    g.pop("_circus_actor", None)
    return str(generate_csrf())


def password_login(username: str, password: str) -> User | None:
    """Check a local password; on success start a session. Audited either way.

    The one login path of the API (``POST /api/v1/auth/login``) and the dashboard.
    """
    from circus import audit
    from circus.auth.service import authenticate_password

    session = db_session()
    user = authenticate_password(session, username, password)
    if user is None:
        audit.record(session, Actor(ActorKind.anonymous, name=username,
                                    remote_addr=client_address()),
                     "auth.login_failed", f"user:{username}")
        session.commit()
        return None
    log_in(user)
    audit.record(session, Actor(ActorKind.user, name=user.username, user_id=user.id,
                                remote_addr=client_address()), "auth.login",
                 f"user:{user.username}")
    session.commit()
    return user


def ldap_login(username: str, password: str) -> User:
    """Log in through the LDAP directory (``server.ldap``); raises on failure. Audited.

    The one LDAP login path of the API (``POST /api/v1/auth/ldap``) and the dashboard.
    """
    from circus.auth import ldap

    config = settings().server.ldap
    if not config.enabled:
        raise NotFound("LDAP login is not enabled on this server",
                       {"hint": "set server.ldap.enabled, uri and bind_dn_template"})
    try:
        identity = ldap.authenticate(config, username, password)
    except CircusError as exc:
        record_failed_login(username, "ldap", exc.message)
        raise
    return external_login(identity, config.default_role)


def external_login(identity: ExternalIdentity, default_role: Role) -> User:
    """Start a session for the user a provider vouched for (created on first login).

    Shared by LDAP and GitHub; a refused login (disabled user) is audited and raised.
    """
    from circus import audit
    from circus.auth.external import sign_in

    session = db_session()
    provider = identity.user_type.value
    try:
        user = sign_in(session, identity, default_role=default_role,
                       remote_addr=client_address())
    except CircusError as exc:
        session.rollback()
        record_failed_login(identity.username, provider, exc.message)
        raise
    log_in(user)
    audit.record(session, Actor(ActorKind.user, name=user.username, user_id=user.id,
                                remote_addr=client_address()), "auth.login",
                 f"user:{user.username}", {"provider": provider})
    session.commit()
    return user


def record_failed_login(name: str | None, provider: str, reason: str) -> None:
    """Audit a refused login (committed at once: the request fails afterwards)."""
    from circus import audit

    session = db_session()
    audit.record(session, Actor(ActorKind.anonymous, name=name, remote_addr=client_address()),
                 "auth.login_failed", f"user:{name}" if name else provider,
                 {"provider": provider, "reason": reason})
    session.commit()


def log_out() -> None:
    if current_user.is_authenticated:
        end_session(db_session(), current_user.token)
        db_session().commit()
    logout_user()
    session.clear()
    g.pop("_circus_actor", None)


def _csrf_guard() -> None:
    """Require a CSRF token on unsafe requests that a browser could forge.

    Forgeable: anything carrying the session cookie, and form-encoded posts
    (``<form>`` can send those cross-site; JSON bodies need CORS preflight).
    """
    if request.method not in UNSAFE_METHODS or bearer_token() is not None:
        return
    if request.method == "POST" and request.endpoint in SELF_AUTHENTICATED_ENDPOINTS:
        return
    if request.mimetype in FORM_TYPES or "_user_id" in session:
        csrf.protect()


def _write_guard() -> None:
    """A read-only API key changes nothing: every unsafe API request made with one is a 403.

    The services check it too (``require_writable``, ``allowed``); this catches the few
    self-service views that write without a service permission check (stars).
    """
    if request.method not in UNSAFE_METHODS or bearer_token() is None \
            or not request.path.startswith("/api/") \
            or request.endpoint in SELF_AUTHENTICATED_ENDPOINTS \
            or request.blueprint in SELF_AUTHENTICATED_BLUEPRINTS:
        return
    require_writable(current_actor())


def _read_guard() -> None:
    if request.method in UNSAFE_METHODS or not request.path.startswith("/api/"):
        return
    if request.method == "OPTIONS" or (request.path in PUBLIC_API_PATHS
                                       and bearer_token() is None):
        return
    # resolve the caller even when reads are open: a bad key is an error, not anonymity
    actor = current_actor()
    if settings().server.require_api_key_for_reads and not actor.is_authenticated:
        raise Unauthenticated("authentication required to read",
                              {"hint": "send Authorization: Bearer <api key> or log in"})
