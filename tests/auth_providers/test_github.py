"""GitHub logins: the app (Flask test client) against the OAuth stub over real HTTP."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import requests
from flask.testing import FlaskClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from circus.common.enums import Role, UserType
from circus.common.models import AuditLog, User, UserSession
from tests.api.conftest import Keys
from tests.auth_providers.github_stub import GithubAccount, GithubStub

MakeClient = Callable[..., FlaskClient]

OCTOCAT = GithubAccount(id=583231, login="octocat", name="The Octocat", email=None, emails=[
    {"email": "old@example.org", "primary": False, "verified": True},
    {"email": "octocat@github.example", "primary": True, "verified": True},
    {"email": "unverified@example.org", "primary": False, "verified": False}])


def github_client(make_client: MakeClient, github: GithubStub, **extra: Any) -> FlaskClient:
    return make_client(oauth={"github": github.settings(**extra)})


def start(client: FlaskClient, next_url: str | None = None) -> str:
    """``GET /api/v1/auth/github``: returns the GitHub authorize URL it redirects to."""
    response = client.get("/api/v1/auth/github",
                          query_string={"next": next_url} if next_url else None)
    assert response.status_code == 302, response.get_data(as_text=True)
    return str(response.headers["Location"])


def at_github(authorize_url: str) -> str:
    """The browser at GitHub (over HTTP): returns where GitHub sends it back."""
    response = requests.get(authorize_url, allow_redirects=False, timeout=10)
    assert response.status_code == 302, response.text
    return str(response.headers["Location"])


def back_at_circus(client: FlaskClient, callback_url: str, **headers: str) -> Any:
    parts = urlsplit(callback_url)
    return client.get(parts.path, query_string=parts.query, headers=headers)


def login(client: FlaskClient, next_url: str | None = None) -> Any:
    return back_at_circus(client, at_github(start(client, next_url)))


def test_first_login_creates_a_read_only_user_with_a_working_session(
        make_client: MakeClient, github: GithubStub, db: Session) -> None:
    github.reset(OCTOCAT)
    client = github_client(make_client, github)
    authorize = start(client, "/project/demo?tab=jobsets")
    query = parse_qs(urlsplit(authorize).query)
    assert authorize.startswith(github.url + "/login/oauth/authorize?")
    assert query["client_id"] == ["circus-test-client"]
    assert query["scope"] == ["read:user user:email"]
    assert query["redirect_uri"] == ["http://localhost/api/v1/auth/github/callback"]
    assert len(query["state"][0]) >= 20
    response = back_at_circus(client, at_github(authorize))
    assert response.status_code == 302, response.get_data(as_text=True)
    assert response.headers["Location"] == "/project/demo?tab=jobsets"

    me = client.get("/api/v1/me")
    assert me.status_code == 200
    body = me.get_json()
    assert body["username"] == "octocat"
    assert body["user_type"] == "github"
    assert body["external_id"] == "583231"
    assert body["role"] == "read-only"
    assert body["full_name"] == "The Octocat"
    # private profile email: the primary verified address from /user/emails
    assert body["email"] == "octocat@github.example"
    assert body["has_password"] is False
    # read-only: may read, may not create projects (with the CSRF token of the session)
    assert client.get("/api/v1/projects").status_code == 200
    csrf = client.get("/api/v1/auth/csrf").get_json()["csrf_token"]
    assert client.post("/api/v1/projects", json={"name": "nope"},
                       headers={"X-CSRFToken": csrf}).status_code == 403
    assert ("POST", "/login/oauth/access_token") in github.state.requests
    assert ("GET", "/api/user/emails") in github.state.requests
    actions = db.execute(select(AuditLog.action, AuditLog.actor, AuditLog.details).where(
        AuditLog.action.in_(["user.create", "auth.login"])).order_by(AuditLog.id)).all()
    assert [(a, actor) for a, actor, _ in actions] == [("user.create", "github-login"),
                                                       ("auth.login", "octocat")]
    assert actions[1][2] == {"provider": "github"}


def test_second_login_reuses_the_user_and_keeps_its_role(
        make_client: MakeClient, github: GithubStub, db: Session) -> None:
    github.reset(OCTOCAT)
    assert login(github_client(make_client, github)).status_code == 302
    user = db.scalar(select(User).where(User.user_type == UserType.github))
    assert user is not None
    user.role = Role.create_projects
    db.commit()
    # renamed at GitHub since: the id decides, the Circus username stays
    github.reset(GithubAccount(id=OCTOCAT.id, login="octo-renamed", email="public@example.org"))
    client = github_client(make_client, github)
    assert login(client, "/projects").headers["Location"] == "/projects"
    me = client.get("/api/v1/me").get_json()
    assert me["id"] == user.id
    assert me["username"] == "octocat"
    assert me["role"] == "create-projects"
    assert db.scalars(select(User.username)).all() == ["octocat"]
    assert len(db.scalars(select(UserSession)).all()) == 2


def test_login_clashing_with_a_local_user_gets_a_distinct_username(
        make_client: MakeClient, github: GithubStub, keys: Keys, db: Session) -> None:
    local = keys.user("octocat", Role.admin, password="local-password-1")
    keys.user("octocat-github")
    github.reset(OCTOCAT)
    client = github_client(make_client, github)
    assert login(client).status_code == 302
    me = client.get("/api/v1/me").get_json()
    assert me["username"] == "octocat-github-2"
    assert me["role"] == "read-only"
    assert me["id"] != local.id
    db.refresh(local)
    assert local.role is Role.admin
    assert local.user_type is UserType.local


def test_wrong_or_missing_state_is_refused(make_client: MakeClient, github: GithubStub,
                                           db: Session) -> None:
    github.reset(OCTOCAT)
    victim = github_client(make_client, github)
    callback = at_github(start(victim))
    # an attacker's callback URL (its own code and state) opened in another browser
    attacker = github_client(make_client, github)
    response = back_at_circus(attacker, callback)
    assert response.status_code == 400
    assert "state mismatch" in response.get_json()["error"]
    assert attacker.get("/api/v1/me").status_code == 401
    # a tampered state in the right browser
    parts = urlsplit(callback)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    response = victim.get(parts.path, query_string={**query, "state": "forged"})
    assert response.status_code == 400
    response = victim.get(parts.path, query_string={"code": query["code"]})
    assert response.status_code == 400
    # no token was ever requested and nobody was created
    assert ("POST", "/login/oauth/access_token") not in github.state.requests
    assert db.scalars(select(User)).all() == []
    # the genuine callback still works once, and a replay of it does not
    assert back_at_circus(victim, callback).status_code == 302
    replay = back_at_circus(github_client(make_client, github), callback)
    assert replay.status_code == 400
    failed = db.scalars(select(AuditLog.details).where(
        AuditLog.action == "auth.login_failed")).all()
    assert len(failed) == 4
    assert all(d["provider"] == "github" for d in failed)


def test_token_endpoint_errors_are_readable(make_client: MakeClient, github: GithubStub,
                                            db: Session) -> None:
    github.reset(OCTOCAT)
    github.state.token_error = "bad_verification_code"
    client = github_client(make_client, github)
    response = login(client)
    assert response.status_code == 401
    assert response.get_json()["error"] == "GitHub refused the login: bad_verification_code"
    # a wrong client secret in Circus's configuration: GitHub says so, Circus passes it on
    github.reset(OCTOCAT)
    client = github_client(make_client, github, client_secret="not-the-secret")
    response = login(client)
    assert response.status_code == 401
    assert "incorrect_client_credentials" in response.get_json()["error"]
    # GitHub down (HTML error page instead of JSON)
    github.reset(OCTOCAT)
    github.state.token_status = 502
    response = login(github_client(make_client, github))
    assert response.status_code == 503
    assert response.get_json()["error"] == "GitHub cannot be reached to finish the login"
    # unreachable API after the exchange
    github.reset(OCTOCAT)
    client = github_client(make_client, github, api_url="http://127.0.0.1:9/api")
    response = login(client)
    assert response.status_code == 503
    assert response.get_json()["error"] == "GitHub cannot be reached"
    assert db.scalars(select(User)).all() == []


def test_denied_authorization_sends_a_browser_back_to_the_login_page(
        make_client: MakeClient, github: GithubStub) -> None:
    github.reset(OCTOCAT)
    github.state.deny = True
    client = github_client(make_client, github)
    callback = at_github(start(client, "/projects"))
    assert "error=access_denied" in callback
    response = back_at_circus(client, callback, Accept="text/html,*/*;q=0.8")
    assert response.status_code == 302
    assert response.headers["Location"] == "/login?next=/projects"
    page = client.get("/login?next=/projects").get_data(as_text=True)
    assert "GitHub login failed: the GitHub login was cancelled or denied" in page
    # an API client gets JSON
    client = github_client(make_client, github)
    response = back_at_circus(client, at_github(start(client)))
    assert response.status_code == 401
    assert response.get_json()["error"] == "the GitHub login was cancelled or denied"


def test_next_must_stay_on_this_site(make_client: MakeClient, github: GithubStub) -> None:
    github.reset(OCTOCAT)
    for target in ("https://evil.example/", "//evil.example/x", "/\\evil.example"):
        client = github_client(make_client, github)
        assert login(client, target).headers["Location"] == "/"


def test_disabled_github_user_and_disabled_provider(
        make_client: MakeClient, github: GithubStub, db: Session) -> None:
    github.reset(OCTOCAT)
    assert login(github_client(make_client, github)).status_code == 302
    user = db.scalar(select(User).where(User.username == "octocat"))
    assert user is not None
    user.enabled = False
    db.commit()
    client = github_client(make_client, github)
    response = login(client)
    assert response.status_code == 403
    assert response.get_json()["error"] == "this account is disabled"
    assert client.get("/api/v1/me").status_code == 401
    # GitHub login off: both endpoints are 404, the login page has no button
    off = make_client()
    assert off.get("/api/v1/auth/github").status_code == 404
    assert off.get("/api/v1/auth/github/callback?code=x&state=y").status_code == 404
    assert "Sign in with GitHub" not in off.get("/login").get_data(as_text=True)


def test_login_page_button_starts_the_flow(make_client: MakeClient, github: GithubStub
                                           ) -> None:
    github.reset(OCTOCAT)
    client = github_client(make_client, github)
    html = client.get("/login?next=/projects").get_data(as_text=True)
    assert "Sign in with GitHub" in html
    href = html.split("Sign in with GitHub")[0].rsplit('href="', 1)[1].split('"')[0]
    assert href == "/api/v1/auth/github?next=/projects"
    response = back_at_circus(client, at_github(start(client, "/projects")))
    assert response.headers["Location"] == "/projects"


def test_callback_url_follows_the_public_base_url(make_client: MakeClient, github: GithubStub
                                                  ) -> None:
    client = make_client(oauth={"github": github.settings()},
                         server={"base_url": "https://ci.example.org/circus/"})
    query = parse_qs(urlsplit(start(client)).query)
    assert query["redirect_uri"] == ["https://ci.example.org/circus/api/v1/auth/github/callback"]


def test_allowed_organizations_restrict_who_may_log_in(
        make_client: MakeClient, github: GithubStub, db: Session) -> None:
    from dataclasses import replace

    restricted = {"allowed_organizations": ["Acme"]}
    github.reset(replace(OCTOCAT, orgs=["other-org"]))
    client = github_client(make_client, github, **restricted)
    authorize = start(client)
    # the membership needs the read:org scope
    assert "read:org" in parse_qs(urlsplit(authorize).query)["scope"][0].split()
    refused = back_at_circus(client, at_github(authorize))
    assert refused.status_code == 403
    assert refused.get_json()["error"] == (
        "GitHub user octocat is not a member of an organization allowed here")
    assert db.scalar(select(User).where(User.username == "octocat")) is None
    assert client.get("/api/v1/me").status_code == 401
    assert ("GET", "/api/user/orgs") in github.state.requests

    github.reset(replace(OCTOCAT, orgs=["other-org", "acme"]))  # org names ignore case
    member = github_client(make_client, github, **restricted)
    assert login(member).status_code == 302
    assert member.get("/api/v1/me").get_json()["username"] == "octocat"
    # without the setting, nobody's organizations are asked for
    github.reset(OCTOCAT)
    open_client = github_client(make_client, github)
    assert "read:org" not in parse_qs(urlsplit(start(open_client)).query)["scope"][0]
