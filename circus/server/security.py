"""Security headers, CORS allowlist and per-IP rate limits (per worker for remote workers).

Rate limits use flask-limiter with in-memory storage: each server process
counts on its own (with N gunicorn workers a client may get up to N times the
configured rate). That is enough to stop password guessing and runaway
scripts without adding a dependency on Redis for the web tier.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable
from typing import Any, TypeVar, cast

from flask import Blueprint, Flask, Response, current_app, request
from flask_cors import CORS
from flask_limiter import Limiter

from circus.common.config import Settings
from circus.common.messaging import WORKER_NAME_HEADER
from circus.common.tokens import token_accepted, token_digest
from circus.server.context import settings

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
}
# the dashboard serves its own scripts and styles; nothing is loaded from elsewhere
CONTENT_SECURITY_POLICY = ("default-src 'self'; img-src 'self' data:; style-src 'self' "
                           "'unsafe-inline'; frame-ancestors 'none'; base-uri 'self'; "
                           "form-action 'self'")
#: bytes a build produced (products, logs, channel files, NARs) are untrusted: a sandboxed
#: document has an opaque origin and runs no script, so an HTML or SVG product cannot act
#: with the viewer's session even when it is shown inline on our origin
BUILD_OUTPUT_CSP = "sandbox"

View = TypeVar("View", bound=Callable[..., Any])


def make_inert(response: Response, *, attachment: bool = False) -> Response:
    """Mark ``response`` as carrying build output: never sniffed, never active content;
    ``attachment`` also tells browsers to save it rather than show it."""
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Content-Security-Policy"] = BUILD_OUTPUT_CSP
    if attachment and not response.headers.get("Content-Disposition", "").startswith(
            "attachment"):
        response.headers["Content-Disposition"] = "attachment"
    return response


def build_output(*, attachment: bool = False) -> Callable[[View], View]:
    """Decorate a view whose response body is (or quotes) bytes a build produced.

    Errors raised by the view are rendered as JSON by ``circus.server.errors`` and do
    not pass through here; every successful answer does.
    """
    def decorate(view: View) -> View:
        @functools.wraps(view)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            result = view(*args, **kwargs)
            if isinstance(result, Response):
                make_inert(result, attachment=attachment)
            return result
        return wrapped  # type: ignore[return-value]
    return decorate


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def trusted_networks(proxies: list[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(p, strict=False) for p in proxies)


def real_client(peer: str, forwarded_for: str, trusted: tuple[Network, ...]) -> str:
    """The client's address: the peer's, unless the peer is a trusted proxy; then the
    right-most ``X-Forwarded-For`` entry that is not a trusted proxy itself (entries to
    its left were written by the client and prove nothing)."""
    if not trusted or not _is_trusted(peer, trusted):
        return peer
    hops = [h.strip() for h in forwarded_for.split(",") if h.strip()]
    for hop in reversed(hops):
        if not _is_trusted(hop, trusted):
            try:
                return str(ipaddress.ip_address(hop))
            except ValueError:
                return peer  # garbage where an address belongs: trust nothing after it
    return hops[0] if hops else peer


def _is_trusted(address: str, trusted: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in trusted)


def client_address() -> str:
    """The address rate limits and stream caps count this request against."""
    trusted: tuple[Network, ...] = current_app.extensions.get("circus_trusted_proxies", ())
    return real_client(request.remote_addr or "", request.headers.get("X-Forwarded-For", ""),
                       trusted)


#: the endpoints that take a username and password
LOGIN_ENDPOINTS = ("users.login", "users.ldap_login", "dashboard.login_submit")


def login_account() -> str:
    """The account name a login request names (lower-cased), for the per-account limit."""
    raw: Any = request.get_json(silent=True) if request.is_json else request.form
    name = raw.get("username") if isinstance(raw, dict) or hasattr(raw, "getlist") else None
    return "account:" + (name.strip().lower()[:128] if isinstance(name, str) else "")


def failed_login(response: Response) -> bool:
    return response.status_code in (401, 403)


def response_headers(settings: Settings) -> list[tuple[str, str]]:
    """The headers every answer carries unless its view set its own (Flask's after-request
    hook and the binary cache's WSGI fast path both send these)."""
    headers = [*SECURITY_HEADERS.items(), ("Content-Security-Policy", CONTENT_SECURITY_POLICY)]
    if settings.server.force_secure_cookies:
        headers.append(("Strict-Transport-Security", "max-age=31536000; includeSubDomains"))
    return headers


def init_app(app: Flask, settings: Settings) -> Limiter:
    app.extensions["circus_trusted_proxies"] = trusted_networks(settings.server.trusted_proxies)
    defaults = response_headers(settings)

    @app.after_request
    def add_security_headers(response: Response) -> Response:
        for name, value in defaults:
            response.headers.setdefault(name, value)
        return response

    origins = settings.server.allowed_origins
    if origins:
        CORS(app, resources={r"/api/*": {"origins": origins}}, supports_credentials=False,
             allow_headers=["Authorization", "Content-Type", "X-CSRFToken"],
             expose_headers=["Retry-After"], max_age=600)

    limiter = Limiter(
        key_func=client_address,
        app=app,
        storage_uri=settings.server.rate_limit_storage or limits_storage(settings.broker.url),
        # Redis gone: count in this process rather than fail requests
        swallow_errors=True,
        in_memory_fallback_enabled=True,
        key_prefix="circus-limits",
        enabled=settings.server.rate_limit_enabled,
        application_limits=[settings.server.rate_limit_api],
        # a worker's calls count against its own budget (limit_workers)
        application_limits_exempt_when=lambda: not request.path.startswith("/api/")
        or remote_worker_key() is not None,
        headers_enabled=True,
    )
    # the app holds it: flask-limiter keeps a disabled limiter nowhere, and the views it
    # decorated (logins) refer to it weakly, so once collected every login was a 500
    app.extensions["circus_limiter"] = limiter
    return limiter


def limits_storage(broker_url: str | None) -> str:
    """Count requests in the broker's Redis, so every server process (and host) shares
    one budget per client; in process memory when the broker is not Redis."""
    if broker_url and broker_url.startswith(("redis://", "rediss://")):
        return broker_url
    if broker_url and broker_url.startswith("redis+socket://"):
        # kombu's name for a Unix socket; the limits library calls it redis+unix
        return "redis+unix://" + broker_url[len("redis+socket://"):]
    return "memory://"


#: where remote workers call (``circus.server.api.workers``)
WORKERS_PREFIX = "/api/v1/workers/"


def remote_worker_key() -> str | None:
    """The rate-limit key of a call to /api/v1/workers carrying a valid worker token
    (``worker:<name>:<token fingerprint>``), else None: a wrong token is just another
    caller and spends its address's API budget."""
    if not request.path.startswith(WORKERS_PREFIX):
        return None
    cached: str | None = request.environ.get("circus.worker_key", "")
    if cached != "":
        return cached
    key = None
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    config = settings()
    if scheme.lower() == "bearer" and token_accepted(token.strip(), config.remote_workers
                                                     .auth_tokens):
        name = request.headers.get(WORKER_NAME_HEADER, "")[:64]
        key = f"worker:{name}:{token_digest(token.strip())[:16]}"
    request.environ["circus.worker_key"] = key
    return key


def limit_workers(app: Flask, limiter: Limiter, settings: Settings) -> None:
    """Authenticated remote workers' own budget (``remote_workers.rate_limit``) on
    /api/v1/workers, per worker; every other caller there spends its address's."""
    if "workers" not in app.blueprints:
        return
    blueprint = cast(Blueprint, app.blueprints["workers"])
    limiter.limit(settings.remote_workers.rate_limit, key_func=lambda: remote_worker_key() or "",
                  exempt_when=lambda: remote_worker_key() is None, scope="remote-workers"
                  )(blueprint)


def limit_login(app: Flask, limiter: Limiter, settings: Settings) -> None:
    """Login throttling: per client address on each login endpoint, and failed attempts
    per account name across all password logins (a password sprayed at one account from
    many addresses, or over the API, the dashboard and LDAP in turn, shares one budget)."""
    per_account = limiter.shared_limit(settings.server.rate_limit_login_account,
                                       scope="login-account", key_func=login_account,
                                       deduct_when=failed_login)
    for endpoint in (*LOGIN_ENDPOINTS, "users.github_callback"):
        view: Callable[..., Any] = limiter.limit(settings.server.rate_limit_login)(
            app.view_functions[endpoint])
        app.view_functions[endpoint] = per_account(view) if endpoint in LOGIN_ENDPOINTS \
            else view
