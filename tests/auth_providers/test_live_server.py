"""Both providers through a real ``circus-server`` process, driven like a browser."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import Engine

from tests.api.live import LiveServer, live_server
from tests.auth_providers.conftest import ldap_section
from tests.auth_providers.github_stub import GithubAccount, GithubStub
from tests.auth_providers.slapd import Slapd
from tests.dashboard.conftest import CHROMIUM_ARGS, SCREENSHOTS


@pytest.fixture(scope="module")
def server(engine: Engine, database_url: str, redis_url: str, slapd: Slapd,
           github_server: GithubStub, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[LiveServer]:
    env = {f"CIRCUS_OAUTH__GITHUB__{k.upper()}": str(v).lower() if isinstance(v, bool)
           else str(v) for k, v in github_server.settings().items()}
    env.update({f"CIRCUS_SERVER__LDAP__{k.upper()}": str(v).lower() if isinstance(v, bool)
                else str(v) for k, v in ldap_section(
                    slapd, start_tls=True, tls_ca_file=str(slapd.ca_file)).items()})
    env["CIRCUS_SERVER__PAGE_ACCESS"] = json.dumps({"projects": "authenticated"})
    state: Path = tmp_path_factory.mktemp("live-auth")
    with live_server(engine, database_url, redis_url, state, **env) as running:
        yield running


def test_github_login_in_a_browser_like_session(server: LiveServer, github: GithubStub
                                                 ) -> None:
    github.reset(GithubAccount(id=4242, login="hubber", email="hubber@example.org"))
    browser = requests.Session()
    browser.headers["Accept"] = "text/html,application/xhtml+xml,*/*;q=0.8"
    # anonymous: the projects page sends the browser to the login page
    page = browser.get(server.url + "/projects", timeout=10)
    assert page.url.startswith(server.url + "/login")
    assert "Sign in with GitHub" in page.text
    # the button → GitHub → the callback → the page we came for, logged in
    landed = browser.get(server.url + "/api/v1/auth/github?next=/projects", timeout=10)
    assert [r.status_code for r in landed.history] == [302, 302, 302]
    assert landed.history[1].url.startswith(github.url + "/login/oauth/authorize")
    assert landed.url == server.url + "/projects"
    assert landed.status_code == 200
    assert "hubber" in landed.text
    me = browser.get(server.url + "/api/v1/me", timeout=10).json()
    assert me["username"] == "hubber"
    assert me["role"] == "read-only"
    assert me["email"] == "hubber@example.org"


def test_ldap_login_over_http_with_start_tls(server: LiveServer) -> None:
    client = requests.Session()
    response = client.post(server.url + "/api/v1/auth/ldap", timeout=10,
                           json={"username": "carol", "password": "carol-password"})
    assert response.status_code == 200, response.text
    assert client.get(server.url + "/api/v1/me", timeout=10).json()["user_type"] == "ldap"
    wrong = requests.post(server.url + "/api/v1/auth/ldap", timeout=10,
                          json={"username": "carol", "password": "nope"})
    assert wrong.status_code == 401
    assert wrong.json() == {"error": "invalid username or password", "details": None}


def in_chromium(script: Callable[[Any], None]) -> None:
    """Run ``script(browser)`` with a headless Chromium of its own, in a thread of its own.

    Playwright's sync API refuses to start while another instance (the dashboard
    tests' session-wide browser) holds this thread, so ours gets a separate one.
    """
    def run() -> None:
        from playwright.sync_api import sync_playwright

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium",
                                                 headless=True, args=CHROMIUM_ARGS)
            try:
                script(browser)
            finally:
                browser.close()

    with ThreadPoolExecutor(1) as pool:
        pool.submit(run).result()


def test_login_page_in_chromium(server: LiveServer, github: GithubStub) -> None:
    github.reset(GithubAccount(id=777, login="clicker"))

    def script(chromium: Any) -> None:
        browser = chromium.new_context(base_url=server.url)
        browser.set_default_timeout(15_000)
        page = browser.new_page()
        page.goto("/projects")
        assert "/login" in page.url
        assert page.input_value("#f-method") == "ldap"
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / "login-ldap-github.png"), full_page=True)
        # the directory account, through the form
        page.fill("#f-username", "erin")
        page.fill("#f-password", "erin-password")
        page.click("form.form button[type=submit]")
        page.wait_for_url(server.url + "/projects")
        assert page.locator("header .who").inner_text().startswith("erin")
        # another browser: the GitHub button, GitHub's approval, back on the page asked for
        other = chromium.new_context(base_url=server.url)
        other.set_default_timeout(15_000)
        page = other.new_page()
        page.goto("/projects")
        page.click("text=Sign in with GitHub")
        page.wait_for_url(server.url + "/projects")
        assert page.locator("header .who").inner_text().startswith("clicker")

    in_chromium(script)
