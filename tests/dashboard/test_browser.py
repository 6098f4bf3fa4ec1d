"""The dashboard in headless Chromium against a real ``circus-server`` process."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from circus.common.nix.environment import nix_environ
from tests.api.live import ADMIN_KEY, LiveServer, live_server
from tests.dashboard.conftest import PASSWORD
from tests.dashboard.factories import Rows, World, populate

USERS = {"users": [{"username": "root", "role": "admin", "password": PASSWORD},
                   {"username": "viewer", "role": "read-only", "password": PASSWORD}],
         "api_keys": [{"name": "live-admin", "key": ADMIN_KEY, "role": "admin",
                       "owner": "root"}]}
NARROW = {"width": 390, "height": 844}
WIDE = {"width": 1280, "height": 900}


@pytest.fixture(scope="module")
def server(engine: Engine, database_url: str, redis_url: str,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with live_server(engine, database_url, redis_url, tmp_path_factory.mktemp("dashboard"),
                     USERS) as running:
        yield running


def build_product(nonce: str) -> str:
    """A real store path holding a release tarball (what a build's product points at)."""
    expr = (f'derivation {{ name = "circus-dash-product-{nonce}"; builder = "/bin/sh"; '
            'system = builtins.currentSystem; args = ["-c" "export PATH=/usr/bin:/bin; '
            f'mkdir -p $out; echo release {nonce} > $out/demo.tar.gz"]; }}')
    out = subprocess.run(["nix-build", "--no-out-link", "-E", expr], capture_output=True,
                         text=True, env=nix_environ([]), check=True).stdout.strip()
    return out + "/demo.tar.gz"


@pytest.fixture(scope="module")
def world(server: LiveServer, engine: Engine, nix_env: dict[str, str]) -> World:
    import uuid

    with Session(engine, expire_on_commit=False) as session:
        made = populate(Rows(session, Path(server.env["CIRCUS_LOGS__LOG_DIR"])),
                        product_path=build_product(uuid.uuid4().hex))
        session.commit()
    return made


def context(chromium: Any, server: LiveServer, viewport: dict[str, int] = WIDE) -> Any:
    made = chromium.new_context(base_url=server.url, viewport=viewport)
    made.set_default_timeout(15_000)
    return made


def log_in(page: Any, username: str) -> None:
    page.fill("#f-username", username)
    page.fill("#f-password", PASSWORD)
    page.click("form.form button[type=submit]")


def shot(page: Any, directory: Path, name: str) -> None:
    page.screenshot(path=str(directory / f"{name}.png"), full_page=True)


def test_log_in_and_walk_project_jobset_evaluation_build(
        chromium: Any, server: LiveServer, world: World, screenshots: Path) -> None:
    browser = context(chromium, server)
    page = browser.new_page()
    page.goto("/")
    shot(page, screenshots, "home-anonymous")
    page.click("text=Log in")
    shot(page, screenshots, "login")
    log_in(page, "root")
    page.wait_for_selector(".flash >> text=Logged in as root")
    shot(page, screenshots, "home")

    page.click("nav.main >> text=Projects")
    page.wait_for_url("**/projects")
    shot(page, screenshots, "projects")
    page.click("table >> text=demo")
    page.wait_for_url("**/project/demo")
    shot(page, screenshots, "project")
    page.click("table >> a:text-is('main')")
    page.wait_for_url("**/jobset/demo/main")
    # the jobs of the newest evaluation, by the last evaluations
    assert page.locator("table.matrix th.job").count() == 6
    shot(page, screenshots, "jobset")
    page.click(f"table.evaluations >> text=#{world.evaluation.id}")
    page.wait_for_url(f"**/eval/{world.evaluation.id}")
    # failures first; the evaluation error is listed
    assert page.locator("nav.tabs [aria-current]").inner_text().startswith("Failed")
    assert "attribute 'nope' missing" in page.locator("details.eval-error").inner_text() or \
        page.locator("details.eval-error summary").inner_text() == "broken"
    shot(page, screenshots, "evaluation")
    page.click(f"table.builds >> text=#{world.failed.id}")
    page.wait_for_url(f"**/build/{world.failed.id}")
    assert "FAIL: test_everything" in page.locator("#log-text").inner_text()
    assert page.locator("button:text-is('Restart')").count() == 1
    shot(page, screenshots, "build-failed")

    # the crumbs lead back up
    page.click(".crumbs >> text=evaluation")
    page.wait_for_url(f"**/eval/{world.evaluation.id}")

    page.goto(f"/build/{world.dependency_failed.id}")
    assert "out of cheese" in page.locator("#log-text").inner_text()
    assert "a dependency" in page.locator(".problem").inner_text()
    shot(page, screenshots, "build-dependency-failed")

    page.goto(f"/build/{world.succeeded.id}")
    with page.expect_download() as download:
        page.click("text=demo.tar.gz")
    assert Path(download.value.path()).read_text().startswith("release ")
    shot(page, screenshots, "build-succeeded")

    for name, path in (("queue", "/queue"), ("machines", "/machines"), ("metrics", "/stats"),
                       ("channels", "/channels"), ("search", "/search?q=test"),
                       ("news", "/news"), ("settings", "/settings"), ("admin", "/admin"),
                       ("admin-users", "/admin/users"), ("admin-builders", "/admin/builders"),
                       ("admin-notifications", "/admin/notifications"),
                       ("admin-audit", "/admin/audit"), ("admin-config", "/admin/config")):
        response = page.goto(path)
        assert response is not None
        assert response.status == 200, path
        shot(page, screenshots, name)
    browser.close()

    narrow = context(chromium, server, NARROW)
    small = narrow.new_page()
    small.goto("/login")
    log_in(small, "root")
    small.wait_for_url("**/")
    small.goto(f"/build/{world.failed.id}")
    # nothing wider than the screen except inside scrolling tables
    width = small.evaluate("document.documentElement.scrollWidth")
    assert width <= NARROW["width"] + 1
    shot(small, screenshots, "build-narrow")
    narrow.close()


def test_create_and_revoke_an_api_key(chromium: Any, server: LiveServer, world: World,
                                      screenshots: Path) -> None:
    browser = context(chromium, server)
    page = browser.new_page()
    page.on("dialog", lambda dialog: dialog.accept())
    page.goto("/settings")
    page.wait_for_url("**/login?next=/settings")
    log_in(page, "viewer")
    page.wait_for_url("**/settings")
    page.fill("#f-name", "laptop")
    page.click("text=Create API key")
    secret = page.locator("#new-api-key").inner_text().strip()
    shot(page, screenshots, "settings-key-created")
    headers = {"Authorization": f"Bearer {secret}"}
    me = requests.get(server.url + "/api/v1/me", headers=headers, timeout=10)
    assert me.status_code == 200
    assert me.json()["username"] == "viewer"
    # the secret is shown once: a reload does not show it again
    page.goto("/settings")
    assert page.locator("#new-api-key").count() == 0
    page.click("tr[data-key=laptop] >> text=Revoke")
    page.wait_for_selector(".flash >> text=API key laptop revoked")
    assert "revoked" in page.locator("tr[data-key=laptop]").inner_text()
    assert requests.get(server.url + "/api/v1/me", headers=headers,
                        timeout=10).status_code == 401
    browser.close()


def test_page_access_for_anonymous_read_only_and_admin(chromium: Any, server: LiveServer,
                                                       world: World) -> None:
    def status(page: Any, path: str) -> int:
        response = page.goto(path)
        assert response is not None
        return int(response.status)

    anonymous = context(chromium, server)
    page = anonymous.new_page()
    assert status(page, "/") == 200
    assert "Running builds" in page.content()
    for path in ("/projects", f"/build/{world.failed.id}", "/queue", "/admin/users"):
        status(page, path)
        assert page.url.endswith("/login?next=" + path.replace("/", "%2F")) or \
            page.url.endswith("/login?next=" + path), (path, page.url)
    # logging in from there returns to the page asked for
    page.goto(f"/build/{world.failed.id}")
    log_in(page, "viewer")
    page.wait_for_url(f"**/build/{world.failed.id}")
    # a read-only user sees builds but no actions and no admin pages
    assert page.locator("form button:text-is('Restart')").count() == 0
    nav = page.locator("nav.main").inner_text()
    assert "Projects" in nav
    assert "Queue" not in nav
    assert "Admin" not in nav
    for path in ("/queue", "/stats", "/admin", "/admin/audit"):
        assert status(page, path) == 403, path
        assert "administrators" in page.content()
    assert status(page, "/machines") == 200
    anonymous.close()

    admin = context(chromium, server)
    page = admin.new_page()
    page.goto("/login")
    log_in(page, "root")
    page.wait_for_url("**/")
    assert "Queue" in page.locator("nav.main").inner_text()
    for path in ("/queue", "/stats", "/admin", "/admin/audit", "/projects"):
        assert status(page, path) == 200, path
    admin.close()


def test_pages_and_forms_work_without_javascript(chromium: Any, server: LiveServer,
                                                 world: World) -> None:
    browser = chromium.new_context(base_url=server.url, java_script_enabled=False)
    browser.set_default_timeout(15_000)
    page = browser.new_page()
    page.goto(f"/build/{world.dependency_failed.id}")
    page.wait_for_url("**/login**")
    log_in(page, "viewer")
    page.wait_for_url(f"**/build/{world.dependency_failed.id}")
    assert "out of cheese" in page.locator("#log-text").inner_text()
    page.click(".crumbs >> text=evaluation")
    page.click("nav.tabs >> text=Succeeded")
    assert page.locator("table.builds tbody tr").count() == 2
    page.goto("/settings")
    page.fill("#f-name", "no-js")
    page.click("text=Create API key")
    assert page.locator("#new-api-key").inner_text().startswith("circus")
    page.goto("/settings")
    page.click("tr[data-key=no-js] >> text=Revoke")
    assert "revoked" in page.locator("tr[data-key=no-js]").inner_text()
    browser.close()
