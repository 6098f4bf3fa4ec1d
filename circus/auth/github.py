"""GitHub logins (OAuth 2 web flow): the client registration and who the token belongs to.

The redirect to GitHub, the ``state`` check and the code exchange are authlib's
(``circus.server.github_login`` drives them); this module registers the client
and reads the user behind an access token from GitHub's REST API. GitHub's
numeric user id is the identity (``external_id``): logins can be renamed.
"""

from __future__ import annotations

from typing import Any

import requests

from circus.auth.external import ExternalIdentity
from circus.common.config import GithubOAuthSettings
from circus.common.enums import UserType
from circus.common.errors import PermissionDenied, Unauthenticated, Unavailable

CLIENT_NAME = "github"
#: the profile and the (private) email addresses, nothing else
SCOPE = "read:user user:email"
#: with ``allowed_organizations``: also the user's organization memberships
ORG_SCOPE = "read:org"
#: seconds for each request to GitHub (token exchange, API)
TIMEOUT = 10.0
API_HEADERS = {"Accept": "application/vnd.github+json", "X-GitHub-Api-Version": "2022-11-28",
               "User-Agent": "circus-ci"}


def register_client(registry: Any, config: GithubOAuthSettings) -> None:
    """Register the OAuth client on an authlib registry (``authlib...flask_client.OAuth``)."""
    registry.register(
        CLIENT_NAME, client_id=config.client_id, client_secret=config.client_secret,
        authorize_url=config.authorize_url, access_token_url=config.access_token_url,
        api_base_url=config.api_url.rstrip("/") + "/",
        # GitHub documents the client credentials in the token request's body
        client_kwargs={"scope": f"{SCOPE} {ORG_SCOPE}" if config.allowed_organizations
                       else SCOPE, "token_endpoint_auth_method": "client_secret_post",
                       "default_timeout": TIMEOUT})


def fetch_identity(api_url: str, access_token: str, *, timeout: float = TIMEOUT
                   ) -> ExternalIdentity:
    """The GitHub user an access token belongs to (``GET /user``, ``/user/emails``)."""
    base = api_url.rstrip("/")
    with requests.Session() as http:
        http.headers.update(API_HEADERS)
        http.headers["Authorization"] = f"Bearer {access_token}"
        user = _get(http, f"{base}/user", timeout)
        if not isinstance(user, dict):
            raise Unavailable("GitHub answered GET /user with something that is not a user")
        user_id, login = user.get("id"), user.get("login")
        if not isinstance(user_id, int) or isinstance(user_id, bool) or not isinstance(
                login, str) or not login:
            raise Unavailable("GitHub's user has no numeric id or login",
                              {"id": str(user_id)[:64], "login": str(login)[:64]})
        email = user.get("email") if isinstance(user.get("email"), str) else None
        if not email:
            email = _primary_email(http, base, timeout)
    name = user.get("name")
    return ExternalIdentity(user_type=UserType.github, external_id=str(user_id),
                            username=login, email=email or None,
                            full_name=name[:256] if isinstance(name, str) and name else None)


def require_organization(api_url: str, access_token: str, allowed: list[str], login: str,
                         *, timeout: float = TIMEOUT) -> None:
    """Refuse the login unless the user belongs to one of the ``allowed`` organizations
    (``GET /user/orgs``, which lists private memberships with the read:org scope)."""
    base = api_url.rstrip("/")
    with requests.Session() as http:
        http.headers.update(API_HEADERS)
        http.headers["Authorization"] = f"Bearer {access_token}"
        orgs = _get(http, f"{base}/user/orgs?per_page=100", timeout)
    member_of = {str(o.get("login", "")).lower() for o in orgs if isinstance(o, dict)} \
        if isinstance(orgs, list) else set()
    if not member_of & {org.lower() for org in allowed}:
        raise PermissionDenied(
            f"GitHub user {login} is not a member of an organization allowed here",
            {"allowed_organizations": list(allowed)})


def _primary_email(http: requests.Session, base: str, timeout: float) -> str | None:
    """The primary verified address (GitHub hides it from ``/user`` when it is private)."""
    try:
        emails = _get(http, f"{base}/user/emails", timeout)
    except (Unauthenticated, Unavailable):
        # no user:email scope granted, or the endpoint failed: the login does not need it
        return None
    if not isinstance(emails, list):
        return None
    verified = [e for e in emails if isinstance(e, dict) and e.get("verified")
                and isinstance(e.get("email"), str)]
    verified.sort(key=lambda e: not e.get("primary"))
    return str(verified[0]["email"]) if verified else None


def _get(http: requests.Session, url: str, timeout: float) -> Any:
    try:
        response = http.get(url, timeout=timeout)
    except requests.RequestException as exc:
        raise Unavailable("GitHub cannot be reached", {"reason": str(exc)[:300]}) from exc
    if response.status_code in (401, 403):
        raise Unauthenticated("GitHub did not accept the access token",
                              {"status": response.status_code})
    if response.status_code != 200:
        raise Unavailable(f"GitHub answered {response.status_code} to GET {url}")
    try:
        return response.json()
    except ValueError as exc:
        raise Unavailable(f"GitHub answered GET {url} with invalid JSON") from exc
