"""Who may see which page, logging in and out, CSRF, and who may act on builds."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import pytest
from flask import Flask

from circus.common.enums import Role
from circus.common.models import AuditLog, User
from tests.dashboard.conftest import PASSWORD, Browser
from tests.dashboard.factories import Rows, World

#: page name in server.page_access → a URL of that page (``{b}`` a build, ``{e}`` an eval)
PAGES = {
    "home": "/", "projects": "/projects", "project": "/project/demo",
    "jobset": "/jobset/demo/main", "evaluation": "/eval/{e}", "build": "/build/{b}",
    "channels": "/channels", "search": "/search?q=demo", "news": "/news",
    "machines": "/machines", "queue": "/queue", "metrics": "/stats",
}
ADMIN_PAGES = ("/admin", "/admin/users", "/admin/builders", "/admin/notifications",
               "/admin/audit", "/admin/config")


def url(page: str, world: World) -> str:
    return PAGES[page].format(b=world.failed.id, e=world.evaluation.id)


def outcome(browser: Browser, path: str) -> str:
    response = browser.get(path)
    if response.status_code == 302:
        parts = urlsplit(response.location)
        assert parts.path == "/login", response.location
        assert parse_qs(parts.query)["next"] == [path], response.location
        return "login"
    return {200: "ok", 403: "forbidden"}[response.status_code]


def test_default_page_access(anonymous: Browser, as_viewer: Browser, as_admin: Browser,
                             world: World) -> None:
    """SPEC §8: home public; queue and metrics admin; others authenticated."""
    expected = dict.fromkeys(PAGES, ("ok", "ok", "ok"))
    for page in PAGES:
        if page not in ("home",):
            expected[page] = ("login", "ok", "ok")
    expected["queue"] = expected["metrics"] = ("login", "forbidden", "ok")
    for page in PAGES:
        got = tuple(outcome(b, url(page, world)) for b in (anonymous, as_viewer, as_admin))
        assert got == expected[page], page
    for path in (*ADMIN_PAGES, "/settings"):
        assert outcome(anonymous, path) == "login", path
    for path in ADMIN_PAGES:
        assert outcome(as_viewer, path) == "forbidden", path
        assert outcome(as_admin, path) == "ok", path
    assert outcome(as_viewer, "/settings") == "ok"


class TestConfiguredAccess:
    @pytest.fixture
    def dash_overrides(self) -> dict[str, Any]:
        return {"server": {"page_access": {"home": "authenticated", "projects": "public",
                                           "build": "public", "queue": "authenticated",
                                           "machines": "admin"}}}

    def test_page_access_follows_the_configuration(self, anonymous: Browser,
                                                   as_viewer: Browser, as_admin: Browser,
                                                   world: World) -> None:
        assert outcome(anonymous, "/") == "login"
        assert outcome(anonymous, "/projects") == "ok"
        assert outcome(anonymous, url("build", world)) == "ok"
        assert outcome(anonymous, "/project/demo") == "login"
        assert outcome(as_viewer, "/queue") == "ok"
        assert outcome(as_viewer, "/machines") == "forbidden"
        assert outcome(as_admin, "/machines") == "ok"
        # admin pages stay admin, settings stay personal, whatever is configured
        assert outcome(anonymous, "/admin") == "login"
        assert outcome(as_viewer, "/admin") == "forbidden"
        assert outcome(anonymous, "/settings") == "login"

    def test_anonymous_sees_no_actions_on_a_public_build(self, anonymous: Browser,
                                                         world: World) -> None:
        page = anonymous.get(url("build", world)).get_data(as_text=True)
        assert "FAIL: test_everything" in page
        assert "Restart</button>" not in page
        # posting anyway sends to the login page, and changes nothing
        response = anonymous.post(f"/build/{world.failed.id}/restart")
        assert response.status_code == 302
        assert response.location.startswith("/login?next=")


def test_navigation_shows_only_reachable_pages(anonymous: Browser, as_viewer: Browser,
                                               as_admin: Browser, world: World) -> None:
    def nav(browser: Browser) -> str:
        page = browser.get("/").get_data(as_text=True)
        return page[page.index('<nav class="main"'):page.index("</nav>")]

    assert "/projects" not in nav(anonymous)
    assert "/queue" not in nav(as_viewer)
    assert "/admin" not in nav(as_viewer)
    assert "/projects" in nav(as_viewer)
    assert "/queue" in nav(as_admin)
    assert "/admin" in nav(as_admin)


def test_login_returns_to_the_page_and_refuses_foreign_targets(anonymous: Browser,
                                                               world: World, rows: Rows,
                                                               users: dict[str, User]) -> None:
    target = f"/build/{world.failed.id}?step=1"
    page = anonymous.get("/login?next=" + quote(target)).get_data(as_text=True)
    assert f'name="next" value="{target}"' in page
    response = anonymous.post("/login", {"username": "vic", "password": PASSWORD,
                                         "next": target})
    assert response.status_code == 302
    assert response.location == target
    assert rows.db.query(AuditLog).filter_by(action="auth.login", actor="vic").count() == 1
    for evil in ("//evil.example/x", "https://evil.example/", "/\\evil.example", "javascript:x"):
        browser = Browser(anonymous.client.application.test_client())
        response = browser.post("/login", {"username": "vic", "password": PASSWORD,
                                           "next": evil})
        assert response.location == "/", evil


def test_wrong_password_re_renders_the_form(anonymous: Browser, rows: Rows,
                                            users: dict[str, User]) -> None:
    response = anonymous.post("/login", {"username": "vic", "password": "wrong-password"})
    assert response.status_code == 401
    page = response.get_data(as_text=True)
    assert "Invalid username or password." in page
    assert 'value="vic"' in page
    assert "wrong-password" not in page
    assert rows.db.query(AuditLog).filter_by(action="auth.login_failed").count() == 1
    empty = anonymous.post("/login", {"username": "", "password": ""})
    assert empty.status_code == 400
    assert empty.get_data(as_text=True).count('class="error"') == 2


def test_logout_ends_the_session(as_viewer: Browser) -> None:
    assert as_viewer.get("/projects").status_code == 200
    response = as_viewer.post("/logout", page="/projects")
    assert response.status_code == 302
    assert as_viewer.get("/projects").status_code == 302


def test_forms_need_a_csrf_token(as_viewer: Browser, anonymous: Browser) -> None:
    for browser, path in ((as_viewer, "/settings/api-keys"), (as_viewer, "/logout"),
                          (anonymous, "/login")):
        response = browser.client.post(path, data={"name": "k", "username": "vic",
                                                   "password": PASSWORD})
        assert response.status_code == 400, path
        assert "Form expired" in response.get_data(as_text=True)
        bad = browser.client.post(path, data={"csrf_token": "forged", "name": "k"})
        assert bad.status_code == 400
    # nothing happened: still logged in, no key
    assert "You have no API keys." in as_viewer.get("/settings").get_data(as_text=True)


def test_bearer_keys_work_on_pages_without_csrf(app: Flask, rows: Rows, world: World) -> None:
    from circus.auth import service
    from tests.dashboard.factories import SYSTEM

    _, secret = service.create_api_key(rows.db, SYSTEM, name="bot", role=Role.read_only)
    rows.db.commit()
    client = app.test_client()
    headers = {"Authorization": f"Bearer {secret}"}
    assert client.get("/projects", headers=headers).status_code == 200
    # a refused key is a 401 saying so, on every page: it redirected to /login, which
    # refused the same header and redirected again, without end
    for path in ("/projects", "/", "/login", "/login?next=/projects"):
        refused = client.get(path, headers={"Authorization": "Bearer nope"})
        assert refused.status_code == 401, (path, refused.headers.get("Location"))
        assert "invalid or revoked API key" in refused.get_data(as_text=True)
    # without a key, a closed page still sends the visitor to log in
    assert client.get("/projects").status_code == 302


def test_build_actions_follow_permissions(app: Flask, as_viewer: Browser, world: World,
                                          users: dict[str, User]) -> None:
    build = f"/build/{world.failed.id}"
    page = as_viewer.get(build).get_data(as_text=True)
    assert "Restart</button>" not in page
    assert "Keep</button>" not in page
    response = as_viewer.post(build + "/restart", page=build)
    assert response.status_code == 403
    assert "vic may not build.restart" in response.get_data(as_text=True)
    # a project member may restart, cancel and bump in their project
    member = Browser(app.test_client()).login("mel")
    assert "Restart</button>" in member.get(build).get_data(as_text=True)
    running = member.get(f"/build/{world.running.id}").get_data(as_text=True)
    assert "Cancel</button>" in running
    assert "Restart</button>" not in running
    queued = member.get(f"/build/{world.queued.id}").get_data(as_text=True)
    assert "Bump to front</button>" in queued
    # evaluate-now is for those who may trigger evaluations
    assert "Evaluate now" in member.get("/jobset/demo/main").get_data(as_text=True)
    assert "Evaluate now" not in as_viewer.get("/jobset/demo/main").get_data(as_text=True)
    forbidden = as_viewer.post("/jobset/demo/main/trigger", page="/jobset/demo/main")
    assert forbidden.status_code == 403


class TestLoginRateLimit:
    @pytest.fixture
    def dash_overrides(self) -> dict[str, Any]:
        return {"server": {"rate_limit_login": "3/minute"}}

    def test_password_guessing_is_slowed_down(self, anonymous: Browser,
                                              users: dict[str, User]) -> None:
        statuses = [anonymous.post("/login", {"username": "vic", "password": "guess"}
                                   ).status_code for _ in range(4)]
        assert statuses == [401, 401, 401, 429]
        page = anonymous.post("/login", {"username": "vic", "password": PASSWORD})
        assert page.status_code == 429
        assert "Too Many Requests" in page.get_data(as_text=True)


def test_build_actions_change_the_build(app: Flask, world: World, rows: Rows,
                                        users: dict[str, User]) -> None:
    from circus.common.enums import BuildStatus
    from circus.common.models import Build

    member = Browser(app.test_client()).login("mel")

    def act(build: Build, action: str) -> str:
        page = f"/build/{build.id}"
        response = member.post(f"{page}/{action}", page=page)
        assert response.status_code == 302
        assert response.location == page
        return member.get(page).get_data(as_text=True)

    page = act(world.failed, "restart")
    assert f"Build {world.failed.id} restarted." in page
    rows.db.refresh(world.failed)
    assert world.failed.status is BuildStatus.pending
    page = act(world.running, "cancel")
    assert "cancelled" in page
    rows.db.refresh(world.running)
    assert world.running.status is BuildStatus.cancelled
    act(world.queued, "bump")
    rows.db.refresh(world.queued)
    assert world.queued.priority > 0
    act(world.succeeded, "keep")
    rows.db.refresh(world.succeeded)
    assert world.succeeded.keep is True
    # cancelling a finished build is a conflict, shown as a message on the page
    page = act(world.succeeded, "cancel")
    assert "already finished" in page
    assert [a.action for a in rows.db.query(AuditLog).filter(
        AuditLog.action.like("build.%")).order_by(AuditLog.id)] == [
        "build.restart", "build.cancel", "build.bump", "build.keep"]
