"""Fixtures for the dashboard: an app sharing the test transaction, logged-in clients,
a populated world, and one headless Chromium for the whole session."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from circus.common.config import Settings
from circus.common.enums import (
    Role,
)
from circus.common.models import User
from tests.api.conftest import make_app
from tests.dashboard.factories import PASSWORD, Rows, World, populate

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
SCREENSHOTS = Path(__file__).resolve().parents[2] / "artifacts" / "screenshots"


@pytest.fixture
def dash_overrides() -> dict[str, Any]:
    """Extra settings sections for the app (a test module may override this fixture)."""
    return {}


@pytest.fixture
def dash_settings(make_settings: Callable[..., Settings], tmp_path: Path,
                  dash_overrides: dict[str, Any]) -> Settings:
    server = {"rate_limit_api": "100000/minute", "rate_limit_login": "1000/minute",
              **dash_overrides.pop("server", {})}
    return make_settings(server=server, logs={"log_dir": str(tmp_path / "logs")},
                         **dash_overrides)


@pytest.fixture
def app(dash_settings: Settings, engine: Engine, db: Session) -> Flask:
    return make_app(dash_settings, engine, db)


@pytest.fixture
def rows(db: Session, dash_settings: Settings) -> Rows:
    return Rows(db, Path(dash_settings.logs.log_dir))


CSRF_RE = re.compile(r'name="csrf_token" value="([^"]+)"')


def csrf_of(html: str) -> str:
    found = CSRF_RE.search(html)
    assert found, "the page has no form with a CSRF token"
    return found.group(1)


class Browser:
    """A Flask test client that logs in through the login form and posts forms with
    the CSRF token of the page they are on."""

    def __init__(self, client: FlaskClient) -> None:
        self.client = client

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.client.get(path, **kwargs)

    def token(self, path: str = "/login") -> str:
        return csrf_of(self.client.get(path).get_data(as_text=True))

    def post(self, path: str, data: dict[str, str] | None = None, *, page: str = "/login",
             **kwargs: Any) -> Any:
        return self.client.post(path, data={"csrf_token": self.token(page), **(data or {})},
                                **kwargs)

    def login(self, username: str, password: str = PASSWORD) -> Browser:
        response = self.post("/login", {"username": username, "password": password})
        assert response.status_code == 302, response.get_data(as_text=True)
        return self


@pytest.fixture
def anonymous(app: Flask) -> Browser:
    return Browser(app.test_client())


@pytest.fixture
def users(rows: Rows) -> dict[str, User]:
    made = {"admin": rows.user("ada", Role.admin), "viewer": rows.user("vic", Role.read_only),
            "member": rows.user("mel", Role.read_only)}
    rows.db.commit()
    return made


@pytest.fixture
def as_admin(app: Flask, users: dict[str, User]) -> Browser:
    return Browser(app.test_client()).login("ada")


@pytest.fixture
def as_viewer(app: Flask, users: dict[str, User]) -> Browser:
    return Browser(app.test_client()).login("vic")


@pytest.fixture
def world(rows: Rows, users: dict[str, User]) -> World:
    made = populate(rows, member=users["member"])
    rows.db.commit()
    return made


# ---------------------------------------------------------------------------
# the browser (one per test module)


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    # Not one per session: while Playwright's sync API is open, its event loop counts as
    # running in the main thread, so every later test of the same pytest worker that
    # calls asyncio.run() failed ("cannot be called from a running event loop")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # launch() gives every run a fresh, temporary user-data-dir of its own
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium",
                                             headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="session")
def screenshots() -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS

