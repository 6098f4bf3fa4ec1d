"""Page-access policy: ``server.page_access`` says per page who may look.

``public`` pages are open to everyone, ``authenticated`` pages need a login (or
an API key), ``admin`` pages need the admin role. Admin pages are always
``admin`` and the user's own settings always need a login, whatever the
configuration says. Anonymous visitors of a closed page are sent to the login
page with a return URL; logged-in users without the role get a 403 page.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

from flask import request

from circus.auth.actor import Actor
from circus.common.enums import PageAccess
from circus.common.errors import PermissionDenied
from circus.server.auth import current_actor
from circus.server.context import settings

F = TypeVar("F", bound=Callable[..., Any])

#: pages outside ``server.page_access``: their level is fixed
FIXED_LEVELS = {
    "admin": PageAccess.admin,
    "settings": PageAccess.authenticated,
    "login": PageAccess.public,
}


class LoginRequired(Exception):
    """An anonymous visitor asked for a page that needs a login."""


def level_of(page: str) -> PageAccess:
    if page in FIXED_LEVELS:
        return FIXED_LEVELS[page]
    return settings().server.access_for(page)


def may_view(actor: Actor, page: str) -> bool:
    level = level_of(page)
    if level is PageAccess.public:
        return True
    if level is PageAccess.authenticated:
        return actor.is_authenticated
    return actor.is_admin


def guard(page: str) -> None:
    actor = current_actor()
    if may_view(actor, page):
        return
    if not actor.is_authenticated:
        raise LoginRequired()
    raise PermissionDenied("this page is for administrators",
                           {"page": page, "role": actor.role and actor.role.value})


def page(name: str) -> Callable[[F], F]:
    """Mark a view as the page ``name`` and enforce its access level."""

    def decorator(view: F) -> F:
        @wraps(view)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            guard(name)
            return view(*args, **kwargs)

        return cast(F, wrapped)

    return decorator


def safe_next(target: str | None, default: str = "/") -> str:
    """A return URL that stays on this site (no scheme, no host, no ``//`` tricks)."""
    if not target or not target.startswith("/") or target.startswith(("//", "/\\")):
        return default
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or any(c in target for c in "\r\n\x00"):
        return default
    return target


def return_url() -> str:
    """Where to come back after logging in: this page, or for a form post the page it
    was posted from."""
    if request.method == "GET":
        return safe_next(request.full_path.rstrip("?"))
    referrer = urlsplit(request.referrer or "")
    if referrer.netloc and referrer.netloc != request.host:
        return "/"
    path = referrer.path + (f"?{referrer.query}" if referrer.query else "")
    return safe_next(path)
