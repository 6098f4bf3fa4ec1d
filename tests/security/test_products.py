"""Issue 12 §3: what builds produce is inert on our origin.

A real ``nix-build`` leaves HTML, SVG and JavaScript in its output; the rows point products,
logs and a channel at it and the cache publishes its NAR. Every route that answers with
those bytes must say ``nosniff`` and either ``attachment`` or ``CSP: sandbox`` — and a
walk over every GET route of the app finds any route that serves them raw without.
"""

from __future__ import annotations

import re
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from circus.cache.publish import publish_outputs
from tests.api.live import ADMIN_KEY
from tests.conftest import KeyPair
from tests.security.web_support import (
    World,
    app_for,
    bearer,
    build_malicious_output,
    get_rules,
    populate_project,
    world_server,
)

RAW_SCRIPT = b"<script>document.title"


@pytest.fixture(scope="module")
def world(engine: Engine, database_url: str, redis_url: str, cache_key: KeyPair,
          nix_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[World]:
    state = tmp_path_factory.mktemp("products")
    built = build_malicious_output(uuid.uuid4().hex)
    with world_server(engine, database_url, redis_url, state,
                      CIRCUS_SIGNING__ENABLED="true",
                      CIRCUS_SIGNING__KEY=cache_key.secret) as made:
        with Session(engine, expire_on_commit=False) as session:
            made.ids = populate_project(session, Path(made.settings.logs.log_dir), built,
                                        name="docs", hidden=False)
            session.commit()
            publish_outputs(session, made.settings, made.ids["build_id"])
            session.commit()
        yield made


def nar_url(world: World) -> str:
    narinfo = requests.get(f"{world.server.url}/nix-cache/{world.ids['hash']}.narinfo",
                           timeout=10)
    assert narinfo.status_code == 200, narinfo.text
    found = re.search(r"^URL: (\S+)$", narinfo.text, re.M)
    assert found is not None
    return "/nix-cache/" + found.group(1)


#: every route that answers with bytes a build wrote (its products, its logs, files derived
#: from its outputs): path templates filled from the world's ids
BUILD_OUTPUT_ROUTES = {
    "build-files.download": ["/api/v1/builds/{build_id}/products/{product_id}/download",
                             "/api/v1/builds/{build_id}/products/{svg_product_id}/download",
                             "/api/v1/builds/{build_id}/products/{directory_product_id}"
                             "/download?path=evil.js"],
    "dashboard.download": ["/build/{build_id}/download/{product_id}",
                           "/build/{build_id}/download/{svg_product_id}",
                           "/build/{build_id}/download/{directory_product_id}",
                           "/build/{build_id}/download/{directory_product_id}/logo.svg"],
    "build-files.log": ["/api/v1/builds/{build_id}/log"],
    "build-files.log_stream": ["/api/v1/builds/{build_id}/log/stream"],
    "dashboard.log": ["/build/{build_id}/log"],
    "dashboard.log_stream": ["/build/{build_id}/log/stream?step={step_id}"],
    "public.git_revision": ["/channel/{channel}/git-revision"],
    "public.binary_cache_url": ["/channel/{channel}/binary-cache-url"],
    "public.store_paths": ["/channel/{channel}/store-paths.xz"],
    "public.nixexprs": ["/channel/{channel}/nixexprs.tar.xz"],
    "cache.nar": ["@nar"],
}


def inert_problem(response: requests.Response) -> str | None:
    """Why ``response`` could run build-made script on our origin (None: it cannot)."""
    if response.headers.get("X-Content-Type-Options") != "nosniff":
        return "no X-Content-Type-Options: nosniff"
    disposition = response.headers.get("Content-Disposition", "")
    policy = [p.strip() for p in response.headers.get("Content-Security-Policy", "").split(";")]
    if not disposition.startswith("attachment") and not any(
            p == "sandbox" or p.startswith("sandbox ") for p in policy):
        return "neither Content-Disposition: attachment nor Content-Security-Policy: sandbox"
    return None


def fetch(world: World, template: str, **kwargs: Any) -> requests.Response:
    path = nar_url(world) if template == "@nar" else template.format(**world.ids)
    return requests.get(world.server.url + path, headers=bearer(ADMIN_KEY), timeout=10,
                        **kwargs)


def test_html_and_svg_products_download_with_nosniff_and_sandbox_or_attachment(
        world: World) -> None:
    """The attack: open an HTML/SVG product (or a file of a directory product) on our
    origin, so its script runs with the viewer's session."""
    api = fetch(world, "/api/v1/builds/{build_id}/products/{product_id}/download")
    assert api.status_code == 200
    assert RAW_SCRIPT in api.content  # the bytes are the build's, unchanged
    assert api.headers["Content-Type"].startswith("text/html")
    assert api.headers["X-Content-Type-Options"] == "nosniff"
    assert api.headers["Content-Disposition"].startswith("attachment")
    assert api.headers["Content-Security-Policy"] == "sandbox"
    page = fetch(world, "/build/{build_id}/download/{svg_product_id}")
    assert page.status_code == 200
    assert page.headers["Content-Type"].startswith("image/svg+xml")
    assert RAW_SCRIPT in page.content
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    # the dashboard shows manuals inline, but sandboxed: an opaque origin, no script
    assert page.headers["Content-Security-Policy"] == "sandbox"


@pytest.mark.parametrize("endpoint", sorted(BUILD_OUTPUT_ROUTES))
def test_every_route_with_build_output_is_inert(world: World, endpoint: str) -> None:
    for template in BUILD_OUTPUT_ROUTES[endpoint]:
        response = fetch(world, template, stream=endpoint.endswith("log_stream"))
        try:
            assert response.status_code == 200, (template, response.status_code,
                                                 response.text[:300])
            assert inert_problem(response) is None, (template, inert_problem(response))
        finally:
            response.close()


def fill(rule: str, ids: dict[str, Any]) -> str | None:
    """``rule`` with its arguments taken from ``ids`` (None: an argument unknown here)."""
    names = {"name": "channel", "path": "path", "filename": "filename"}
    values = {**ids, "sub": "index.html", "filename": "circus.css", "forge": "github"}
    missing = []

    def value(match: re.Match[str]) -> str:
        arg = match.group(2)
        key = arg if arg in values else names.get(arg, arg)
        if key not in values:
            missing.append(arg)
            return ""
        return str(values[key])

    url = re.sub(r"<(?:([a-z]+)(?:\([^)]*\))?:)?([a-z_]+)>", value, rule)
    return None if missing else url


#: GET routes whose arguments name objects this module does not make (admin-only records)
ADMIN_OBJECTS = {"builder_id": 1, "machine_id": "none", "task_id": 1, "news_id": 1,
                 "key_id": 1, "user_id": 1, "input_name": "none", "name": "none"}


def test_no_get_route_serves_build_output_raw(world: World) -> None:
    """Every GET route of the app, filled with the ids of the malicious build's objects,
    fetched as admin: whatever answers with the build's script unescaped, outside JSON,
    must be inert; a route this test cannot fill fails it (add its arguments above)."""
    unfilled, raw = [], []
    ids = {**ADMIN_OBJECTS, **world.ids, "channel": world.ids["channel"]}
    for endpoint, rule in get_rules(app_for(world.settings)):
        if endpoint == "cache.nar":
            url: str | None = nar_url(world)
        elif endpoint == "cache.narinfo":
            url = rule.replace("<name>", ids["hash"]).replace("<project>", ids["project"])
        else:
            url = fill(rule.replace("<name:channel>", "<name:name>").replace(
                "<name>", "<name:name>"), {**ids, "name": ids["channel"]})
        if url is None:
            unfilled.append(rule)
            continue
        with requests.get(world.server.url + url, headers=bearer(ADMIN_KEY), timeout=10,
                          stream=True) as response:
            assert response.status_code < 500, (url, response.text[:300])
            body = response.raw.read(256 * 1024)
            media = response.headers.get("Content-Type", "")
            if RAW_SCRIPT in body and not media.startswith("application/json") \
                    and inert_problem(response) is not None:
                raw.append((endpoint, url, inert_problem(response)))
            if endpoint in BUILD_OUTPUT_ROUTES:
                assert inert_problem(response) is None or response.status_code != 200, url
    assert not unfilled, f"routes this test cannot fill: {unfilled}"
    assert not raw, f"routes serving build output as active content: {raw}"


def titles_in_chromium(base_url: str, paths: list[str]) -> dict[str, str]:
    """Log in as root in headless Chromium, open each path and read ``document.title``
    (the malicious script sets it to 'pwned'); first, as a control, the same HTML
    rendered without our headers. Playwright's event loop lives and dies in its own
    thread, so none is left set in the test's."""
    from playwright.sync_api import sync_playwright

    from tests.dashboard.conftest import CHROMIUM_ARGS
    from tests.security.web_support import HTML, PASSWORD

    result: dict[str, str] = {}
    failure: list[BaseException] = []

    def run() -> None:
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path="/usr/bin/chromium",
                                                     headless=True, args=CHROMIUM_ARGS)
                try:
                    context = browser.new_context(base_url=base_url)
                    context.set_default_timeout(15_000)
                    page = context.new_page()
                    page.set_content(HTML)
                    result["control"] = page.title()
                    page.goto("/login")
                    page.fill("#f-username", "root")
                    page.fill("#f-password", PASSWORD)
                    page.click("form.form button[type=submit]")
                    page.wait_for_url("**/")
                    for path in paths:
                        page.goto(path)
                        page.wait_for_timeout(300)
                        result[path] = page.title()
                        result[path + " text"] = page.locator("h1").all_inner_texts()[0] \
                            if page.locator("h1").count() else ""
                finally:
                    browser.close()
        except BaseException as exc:  # handed to the test's thread
            failure.append(exc)

    thread = threading.Thread(target=run, name="chromium-check", daemon=True)
    thread.start()
    thread.join(120)
    assert not thread.is_alive(), "the Chromium check hung"
    if failure:
        raise failure[0]
    return result


def test_chromium_runs_no_script_of_a_product_viewed_on_the_dashboard(world: World) -> None:
    ids = world.ids
    paths = [f"/build/{ids['build_id']}/download/{ids['product_id']}",
             # inside the directory its relative <script src='evil.js'> is same-origin
             f"/build/{ids['build_id']}/download/{ids['directory_product_id']}/index.html",
             f"/build/{ids['build_id']}/download/{ids['svg_product_id']}"]
    seen = titles_in_chromium(world.server.url, paths)
    assert seen.pop("control") == "pwned"  # the check sees script that runs
    # the manual was shown (not an error page), and its scripts did not run
    assert seen[paths[0] + " text"] == seen[paths[1] + " text"] == "manual", seen
    assert [seen[path] for path in paths] == ["", "", ""], seen


# ---------------------------------------------------------------------------
# server.products_origin: products viewed in a browser come from another origin

FILES_HOST = "files.circus.test"


@pytest.fixture(scope="module")
def split(engine: Engine, database_url: str, redis_url: str,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """A second server with ``server.products_origin`` set; the products origin is the
    same process reached under another host name. (Starting it empties the database:
    the test using it is the module's last.)"""
    with world_server(engine, database_url, redis_url, tmp_path_factory.mktemp("split"),
                      CIRCUS_SERVER__PRODUCTS_ORIGIN=f"http://{FILES_HOST}") as made:
        with Session(engine, expire_on_commit=False) as session:
            made.ids = populate_project(session, Path(made.settings.logs.log_dir),
                                        build_malicious_output(uuid.uuid4().hex),
                                        name="docs", hidden=False)
            session.commit()
        yield made


def on_files_host(world: World, path: str) -> requests.Response:
    return requests.get(world.server.url + path, headers={"Host": FILES_HOST}, timeout=10,
                        allow_redirects=False)


def test_products_origin_serves_products_by_signed_link_and_nothing_else(
        split: World) -> None:
    ids = split.ids
    asked = requests.get(
        f"{split.server.url}/build/{ids['build_id']}/download/{ids['directory_product_id']}",
        headers=bearer(ADMIN_KEY), timeout=10, allow_redirects=False)
    assert asked.status_code == 302
    location = asked.headers["Location"]
    assert location.startswith(f"http://{FILES_HOST}/files/")
    path = location[len(f"http://{FILES_HOST}"):]
    page = on_files_host(split, path)
    assert page.status_code == 200, page.text[:300]
    assert RAW_SCRIPT in page.content
    assert inert_problem(page) is None
    # the manual's relative links stay inside the same grant
    script = on_files_host(split, path + "evil.js")
    assert script.status_code == 200
    assert "set-cookie" not in {k.lower() for k in script.headers}
    # a forged or altered grant is no grant
    grant = path.split("/")[2]
    for forged in (grant[:-2] + ("AA" if not grant.endswith("AA") else "BB"), "x", ""):
        refused = on_files_host(split, f"/files/{forged}/index.html")
        assert refused.status_code == 404
    # the products origin serves nothing that carries a session, the main one no files
    for other in ("/", "/api/v1/me", f"/build/{ids['build_id']}", "/login"):
        assert on_files_host(split, other).status_code == 404, other
    main = requests.get(split.server.url + path, headers=bearer(ADMIN_KEY), timeout=10)
    assert main.status_code == 404
