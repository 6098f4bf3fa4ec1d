"""The whole system through the dashboard: a real evaluation and real builds.

``circus-server``, ``circus-evaluator`` and ``circus-queue-runner`` run as
daemons; Chromium creates a project and a jobset from the forms, asks for an
evaluation, watches a build's log live, and restarts a failed build.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import Engine

from circus.common.nix.environment import DEFAULT_SANDBOX_PATHS, current_system
from tests.api.live import ADMIN_KEY, LiveServer, live_server
from tests.dashboard.conftest import PASSWORD
from tests.dashboard.test_browser import USERS, context, log_in, shot
from tests.helpers.daemons import Daemon, circus_command
from tests.helpers.gitrepo import GitRepo

FLAKE = """
{
  outputs = { self }:
    let
      system = "@SYSTEM@";
      sh = name: script: derivation {
        inherit name system;
        builder = "/bin/sh";
        args = [ "-c" ("export PATH=/usr/bin:/bin; set -e; " + script) ];
      };
    in {
      hydraJobs = {
        tarball = sh "tarball-@NONCE@" ''
          mkdir -p $out/tarballs $out/nix-support
          echo release @NONCE@ > $out/tarballs/demo.tar.gz
          echo "file source-dist $out/tarballs/demo.tar.gz" > $out/nix-support/hydra-build-products
          echo "tarball-size 42 bytes" > $out/nix-support/hydra-metrics
        '';
        flaky = sh "flaky-@NONCE@" ''
          echo "checking the weather"
          if [ -e @STATE@/sunny ]; then echo "sunny today"; echo ok > $out; exit 0; fi
          echo "FAIL: it rains"
          exit 1
        '';
        slow = sh "slow-@NONCE@" ''
          i=0
          while [ ! -e @STATE@/release ] && [ $i -lt 240 ]; do
            i=$((i + 1)); echo "tick $i"; sleep 0.25
          done
          echo "released"; echo done > $out
        '';
      };
    };
}
"""
RUNNER = {"CIRCUS_QUEUE_RUNNER__POLL_INTERVAL": "1", "CIRCUS_QUEUE_RUNNER__LEASE_SECS": "5",
          "CIRCUS_QUEUE_RUNNER__REPUBLISH_SECS": "2", "CIRCUS_QUEUE_RUNNER__WORKERS": "2",
          "CIRCUS_QUEUE_RUNNER__BATCH_SIZE": "1", "CIRCUS_QUEUE_RUNNER__LOCAL_FEATURES": "[]",
          "CIRCUS_EVALUATOR__POLL_INTERVAL": "1", "CIRCUS_EVALUATOR__NIX_TIMEOUT": "120"}


@dataclass
class System:
    server: LiveServer
    repo: GitRepo
    #: where the test drops the files the builds wait for (readable by nixbld users:
    #: pytest's own temporary directories are private to root)
    flags: Path


@pytest.fixture(scope="module")
def system(engine: Engine, database_url: str, redis_url: str, nix_env: dict[str, str],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    state = tmp_path_factory.mktemp("e2e")
    flags = Path(tempfile.mkdtemp(prefix="circus-dashboard-flags-"))
    flags.chmod(0o755)
    nonce = uuid.uuid4().hex
    repo = GitRepo(state / "repo")
    repo.commit({"flake.nix": FLAKE.replace("@SYSTEM@", current_system())
                 .replace("@NONCE@", nonce).replace("@STATE@", str(flags))}, "jobs")
    # the builds run in Nix's sandbox: the flags directory is the one host path they see
    sandbox_paths = json.dumps([*DEFAULT_SANDBOX_PATHS, str(flags)])
    with live_server(engine, database_url, redis_url, state, USERS, **RUNNER,
                     CIRCUS_NIX__SANDBOX_PATHS=sandbox_paths) as server:
        env = {**server.env, **nix_env}
        daemons = [Daemon("evaluator", [circus_command("circus-evaluator")],
                          state / "daemon-logs", env=env, cwd=state),
                   Daemon("queue-runner", [circus_command("circus-queue-runner")],
                          state / "daemon-logs", env=env, cwd=state)]
        for daemon in daemons:
            daemon.start()
        try:
            yield System(server, repo, flags)
        finally:
            for daemon in daemons:
                daemon.stop()
            shutil.rmtree(flags, ignore_errors=True)


def reload_until(page: Any, selector: str, timeout: float = 90, what: str = "") -> None:
    """Reload a page (no auto-refresh there) until ``selector`` appears."""
    deadline = time.monotonic() + timeout
    while page.locator(selector).count() == 0:
        if time.monotonic() > deadline:
            raise AssertionError(f"{what or selector} did not appear on {page.url}")
        time.sleep(0.5)
        page.reload()


def test_evaluate_watch_a_build_live_and_restart_a_failed_one(
        chromium: Any, system: System, screenshots: Path) -> None:
    from playwright.sync_api import expect

    browser = context(chromium, system.server)
    browser.set_default_timeout(30_000)
    page = browser.new_page()
    page.goto("/login")
    log_in(page, "root")
    page.wait_for_url("**/")

    # a project and a jobset, made with the forms
    page.goto("/projects")
    page.click("summary:text('Create a project')")
    page.fill("#f-name", "e2e")
    page.fill("#f-repository_url", system.repo.url)
    page.click("text=Create project")
    page.wait_for_url("**/project/e2e")
    page.click("summary:text('Add a jobset')")
    page.fill("#f-name", "main")
    page.fill("#f-branch", "main")
    page.click("button:text('Add jobset')")
    page.wait_for_url("**/jobset/e2e/main")

    # evaluate now: the evaluator daemon evaluates the flake, builds appear
    page.click("button:text('Evaluate now')")
    page.wait_for_url("**/eval/*")
    expect(page.locator(".flash")).to_contain_text("queued")
    reload_until(page, "h1 >> text=completed", what="the completed evaluation")
    assert system.repo.head() in page.locator("dl.facts").inner_text()
    page.click("nav.tabs >> text=All")
    rows = page.locator("table.builds tbody tr")
    expect(rows).to_have_count(3)
    assert sorted(rows.locator("td.job").all_inner_texts()) == ["flaky", "slow", "tarball"]
    shot(page, screenshots, "e2e-evaluation")

    # the slow build: its log grows on the page while it runs
    page.click("table.builds tr:has-text('slow') a[href^='/build/']")
    reload_until(page, "#build-status >> text=running", what="the running slow build")
    log = page.locator("#log-text")
    expect(log).to_contain_text("tick 3")
    expect(log).to_contain_text("tick 8")
    # nothing is shown twice (the page's text, then the stream from where it stopped)
    assert re.findall(r"^tick 2$", log.inner_text(), re.M) == ["tick 2"]
    shot(page, screenshots, "e2e-build-running")
    (system.flags / "release").touch()
    # when it finishes the page reloads itself with the outcome
    expect(page.locator("#build-status")).to_contain_text("succeeded", timeout=60_000)
    expect(log).to_contain_text("released")

    # the failed build: restart it from its page once the weather changed
    page.click(".crumbs >> text=evaluation")
    page.click("nav.tabs >> text=Failed")
    page.click("table.builds tr:has-text('flaky') a[href^='/build/']")
    reload_until(page, "#build-status >> text=failed", what="the failed flaky build")
    expect(log).to_contain_text("FAIL: it rains")
    shot(page, screenshots, "e2e-build-failed")
    (system.flags / "sunny").touch()
    page.click("button:text-is('Restart')")
    expect(page.locator(".flash")).to_contain_text("restarted")
    expect(page.locator("#build-status")).to_contain_text("succeeded", timeout=60_000)
    expect(log).to_contain_text("sunny today")
    # both attempts stay listed; the audit log names who restarted it
    expect(page.locator("table.steps tbody tr")).to_have_count(2)

    # the tarball: its product downloads, its metric is shown
    page.click(".crumbs >> text=evaluation")
    page.click("nav.tabs >> text=Succeeded")
    page.click("table.builds tr:has-text('tarball') a[href^='/build/']")
    expect(page.locator("text=tarball-size")).to_be_visible()
    with page.expect_download() as download:
        page.click("a:text('demo.tar.gz')")
    assert Path(download.value.path()).read_text().startswith("release ")
    shot(page, screenshots, "e2e-build-product")

    # re-evaluating the unchanged flake reuses every build
    page.click(".crumbs >> a:text-is('main')")
    expect(page.locator("table.matrix th.job")).to_have_count(3)
    page.click("button:text('Evaluate now')")
    page.wait_for_url("**/eval/*")
    reload_until(page, "h1 >> text=completed", what="the second evaluation")
    page.click("nav.tabs >> text=All")
    expect(page.locator("table.builds tbody tr .tag:text('reused')")).to_have_count(3)
    page.goto("/admin/audit?action=build.restart")
    expect(page.locator("table tbody tr")).to_have_count(1)
    assert "root" in page.locator("table tbody tr").inner_text()
    page.goto("/machines")
    expect(page.locator("text=queue-runner")).not_to_have_count(0)
    shot(page, screenshots, "e2e-machines")
    browser.close()


DAG_FLAKE = """
{
  outputs = { self }:
    let
      system = "@SYSTEM@";
      sh = name: script: derivation {
        inherit name system;
        builder = "/bin/sh";
        args = [ "-c" ("export PATH=/usr/bin:/bin; set -e; " + script) ];
      };
      leaf = sh "leaf-@NONCE@" ''
        echo "compiling the leaf"
        echo "leaf is broken beyond repair"
        exit 3
      '';
      lib = sh "lib-@NONCE@" "echo ${leaf} > $out";
      tool = sh "tool-@NONCE@" "echo ${leaf} > $out";
    in {
      hydraJobs.app = sh "app-@NONCE@" "echo ${lib} ${tool} > $out";
    };
}
"""


def wait_for_finished_build(api: requests.Session, url: str, project_id: int,
                            timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        items = api.get(f"{url}/api/v1/builds", params={"project_id": project_id},
                        timeout=10).json()["items"]
        if items and items[0]["status"] not in ("pending", "running"):
            return dict(items[0])
        time.sleep(0.5)
    raise AssertionError(f"no finished build in project {project_id}")


def test_step_graph_of_a_dependency_failed_build(
        chromium: Any, system: System, screenshots: Path, tmp_path: Path) -> None:
    """app → {lib, tool} → leaf; the leaf fails: the API gives the edges and the path
    down to the leaf, the page draws the tree with the leaf once and a reference."""
    from playwright.sync_api import expect

    nonce = uuid.uuid4().hex
    repo = GitRepo(tmp_path / "dag")
    repo.commit({"flake.nix": DAG_FLAKE.replace("@SYSTEM@", current_system())
                 .replace("@NONCE@", nonce)}, "a failing leaf")
    url = system.server.url
    api = requests.Session()
    api.headers["Authorization"] = f"Bearer {ADMIN_KEY}"
    project = api.post(f"{url}/api/v1/projects", timeout=10, json={
        "name": "dag", "repository_url": repo.url, "hidden": True}).json()
    jobset = api.post(f"{url}/api/v1/projects/{project['id']}/jobsets", timeout=10,
                      json={"name": "main", "branch": "main"}).json()
    trigger = api.post(f"{url}/api/v1/evaluations/trigger", timeout=10,
                       json={"jobset_id": jobset["id"]})
    assert trigger.status_code == 202, trigger.text
    build = wait_for_finished_build(api, url, project["id"])
    assert (build["job_name"], build["status"]) == ("app", "dependency_failed")

    steps = api.get(f"{url}/api/v1/builds/{build['id']}/steps", timeout=10).json()
    by_name = {s["drv_path"].split("-", 1)[1].removesuffix(f"-{nonce}.drv"): s for s in steps}
    assert sorted(by_name) == ["app", "leaf", "lib", "tool"]
    ids = {name: s["id"] for name, s in by_name.items()}
    edges = {name: sorted(s["depends_on"]) for name, s in by_name.items()}
    assert edges == {"app": sorted([ids["lib"], ids["tool"]]), "lib": [ids["leaf"]],
                     "tool": [ids["leaf"]], "leaf": []}
    assert by_name["leaf"]["status"] == "failed"
    assert by_name["lib"]["status"] == by_name["app"]["status"] == "dependency_failed"

    found = api.get(f"{url}/api/v1/builds/{build['id']}/steps/failure", timeout=10).json()
    assert found["failed_step"]["id"] == ids["leaf"]
    assert found["failed_step"]["exit_code"] == 3
    assert [s["id"] for s in found["path"]][::2] == [ids["app"], ids["leaf"]]
    assert found["path"][1]["id"] in (ids["lib"], ids["tool"])
    assert found["machine"]
    assert found["machine"] == by_name["leaf"]["machine"]
    assert "leaf is broken beyond repair" in found["log_tail"]

    # the hidden project's build is not there for someone outside it
    outsider = requests.Session()
    login = outsider.post(f"{url}/api/v1/auth/login", timeout=10,
                          json={"username": "viewer", "password": PASSWORD})
    assert login.status_code == 200, login.text
    for path in ("steps", "steps/failure"):
        response = outsider.get(f"{url}/api/v1/builds/{build['id']}/{path}", timeout=10)
        assert response.status_code == 404, response.text
        assert response.json()["error"]

    browser = context(chromium, system.server)
    page = browser.new_page()
    page.goto("/login")
    log_in(page, "root")
    page.wait_for_url("**/")
    page.goto(f"/build/{build['id']}")
    tree = page.locator("ul.step-tree")
    # drawn in full once (under lib), referenced once (under tool)
    expect(tree.locator(f"li#step-{ids['leaf']}")).to_have_count(1)
    expect(tree.locator("li.step-ref")).to_have_count(1)
    assert f"leaf-{nonce}" in tree.locator("li.step-ref").inner_text()
    failure_path = page.locator("#failure-path").inner_text()
    assert f"app-{nonce}" in failure_path
    assert f"leaf-{nonce}" in failure_path
    assert found["machine"] in failure_path
    # the failed leaf's log is the one the page opens with
    assert "leaf is broken beyond repair" in page.locator("#log-text").inner_text()
    shot(page, screenshots, "e2e-build-step-graph")
    browser.close()
