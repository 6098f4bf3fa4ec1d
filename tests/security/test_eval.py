"""Issue 12 §2: evaluation is isolated by default.

The attacks are Nix code in real git repositories, evaluated by the real
evaluator: ``circus-evaluator`` next to a ``circus-server`` (both started as
users start them, on their defaults), and, for the one property that needs
restricted mode off, the evaluation worker's code in this process. A unique
marker is planted in a server file, the server's config file, its secret key
and its environment; it must never come back through the API.

The in-process test comes first: its fixtures empty the tables, which the
module's live server must not see while it runs.
"""

from __future__ import annotations

import html
import json
import os
import re
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from circus.common import localsource
from circus.common.config import EvaluatorSettings, Settings, load_settings
from circus.common.configbase import ConfigError
from circus.common.enums import BuildStatus, EvaluationStatus
from circus.common.models import User
from circus.common.nix.environment import current_system, nix_environ
from circus.evaluator import execution
from circus.evaluator.git import Mirror
from tests.api.live import ADMIN_KEY, LiveServer, live_server
from tests.dashboard.factories import Rows
from tests.evaluator.conftest import (  # noqa: F401 (fixtures)
    World,
    celery_app,
    eval_settings,
    factory,
    world,
)
from tests.helpers.daemons import Daemon, circus_command
from tests.helpers.gitrepo import GitRepo
from tests.security.web_support import evaluate

MARKER = f"circus-server-secret-{uuid.uuid4().hex}"
#: what /etc/passwd starts with on every Linux
PASSWD_CONTENT = "root:x:0:0"
MALLORY_KEY = "mallory-create-projects-key-0123456789"
MALLORY_PASSWORD = "mallory-password-" + "x" * 8
USERS = {"users": [{"username": "root", "role": "admin"},
                   {"username": "mallory", "role": "create-projects",
                    "password": MALLORY_PASSWORD}],
         "api_keys": [{"name": "live-admin", "key": ADMIN_KEY, "role": "admin",
                       "owner": "root"},
                      {"name": "mallory", "key": MALLORY_KEY, "role": "create-projects",
                       "owner": "mallory"}]}
STORED_TABLES = ("evaluations", "evaluation_errors", "jobsets", "builds", "build_outputs")


def leaky_release(secret_file: Path, secret_nix: Path, config_file: Path, private: Path
                  ) -> str:
    """A classic jobset that tries every way to read the server into its errors."""
    system = current_system()
    return f"""{{ ... }}:
let
  leak = what: throw "leaked: ${{what}}";
in {{
  passwd = leak (builtins.readFile /etc/passwd);
  secretFile = leak (builtins.readFile {secret_file});
  serverConfig = leak (builtins.readFile {config_file});
  importSecret = leak (import {secret_nix});
  listEtc = leak (builtins.toJSON (builtins.attrNames (builtins.readDir /etc)));
  procEnviron = leak (builtins.readFile /proc/self/environ);
  # a symlink in the repository, pointing at the server file
  symlink = leak (builtins.readFile ./link);
  fetchGit = leak (builtins.readFile "${{builtins.fetchGit "file://{private}"}}/secret.txt");
  fetchurl = leak (builtins.readFile (builtins.fetchurl "file:///etc/passwd"));
  environment = leak "key=${{builtins.getEnv "CIRCUS_SERVER__SECRET_KEY"}}|db=${{
    builtins.getEnv "CIRCUS_DATABASE__URL"}}|home=${{builtins.getEnv "HOME"}}|";
  own = derivation {{
    name = "own-" + builtins.unsafeDiscardStringContext (builtins.readFile ./own.txt);
    system = "{system}"; builder = "/bin/sh"; args = [ "-c" "echo > $out" ];
  }};
}}
"""


def leaky_flake(secret_file: Path, escape: str) -> str:
    return f"""{{
  outputs = {{ self }}: {{
    hydraJobs = {{
      passwd = throw "leaked: ${{builtins.readFile /etc/passwd}}";
      secretFile = throw "leaked: ${{builtins.readFile {secret_file}}}";
      otherRepository = throw "leaked: ${{builtins.readFile
        "${{builtins.fetchTree "{escape}"}}/secret.txt"}}";
      environment = throw "leaked: key=${{builtins.getEnv "CIRCUS_SERVER__SECRET_KEY"}}|";
    }};
  }};
}}
"""


def test_restricted_evaluation_is_the_default_and_the_allowlist_is_validated() -> None:
    assert EvaluatorSettings().restrict_eval is True
    assert EvaluatorSettings().allowed_path_inputs == []
    with pytest.raises(ConfigError) as raised:
        load_settings(files=[], environ={}, overrides={
            "evaluator": {"allowed_path_inputs": ["/srv/ok", "srv/relative"]}})
    assert [(p.path, p.message) for p in raised.value.problems] == [
        ("evaluator.allowed_path_inputs.1", "must be an absolute path (got 'srv/relative')")]


# ---------------------------------------------------------------------------
# the scrubbed environment (restricted mode off, so getEnv answers)


def test_nix_sees_none_of_the_servers_environment_even_unrestricted(
        world: World, git_repo: Callable[..., GitRepo],  # noqa: F811
        make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    server_home = tmp_path / "server-home"
    server_home.mkdir()
    monkeypatch.setenv("CIRCUS_SERVER__SECRET_KEY", MARKER)
    monkeypatch.setenv("CIRCUS_DATABASE__URL", f"postgresql://circus:{MARKER}@db/circus")
    monkeypatch.setenv("GITHUB_TOKEN", MARKER)
    monkeypatch.setenv("HOME", str(server_home))
    repo = git_repo("env")
    repo.commit({"release.nix": """{ ... }: {
  environment = throw "leaked: key=${builtins.getEnv "CIRCUS_SERVER__SECRET_KEY"}|db=${
    builtins.getEnv "CIRCUS_DATABASE__URL"}|token=${builtins.getEnv "GITHUB_TOKEN"}|home=${
    builtins.getEnv "HOME"}|path=${builtins.getEnv "PATH"}";
}"""})
    settings = make_settings(evaluator={"restrict_eval": False, "nix_timeout": 120})
    evaluation = world.evaluate(world.jobset(repo.url, flake=False, expression="release.nix"),
                                settings)
    assert evaluation.status is EvaluationStatus.completed, evaluation.error_message
    [error] = evaluation.errors
    message = error.message
    assert MARKER not in message
    assert str(server_home) not in message
    assert "key=|db=|token=|" in message
    # getEnv does work here (PATH is kept), and HOME is the evaluator's own
    assert "|path=|" not in message
    assert f"home={execution.nix_home(settings)}|" in message


def test_flakes_stay_restricted_when_classic_jobsets_are_not(
        world: World, git_repo: Callable[..., GitRepo],  # noqa: F811
        make_settings: Callable[..., Settings]) -> None:
    repo = git_repo("flake-unrestricted")
    repo.commit({"flake.nix": """{ outputs = { self }: { hydraJobs = {
  passwd = throw "leaked: ${builtins.readFile /etc/passwd}";
}; }; }"""})
    settings = make_settings(evaluator={"restrict_eval": False, "nix_timeout": 120})
    evaluation = world.evaluate(world.jobset(repo.url), settings)
    assert evaluation.status is EvaluationStatus.completed, evaluation.error_message
    [error] = evaluation.errors
    assert PASSWD_CONTENT not in error.message
    assert "access to absolute path '/etc/passwd' is forbidden in restricted mode" in (
        error.message)


def test_nix_eval_jobs_runs_restricted_in_the_scrubbed_environment(
        world: World, git_repo: Callable[..., GitRepo],  # noqa: F811
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The other evaluation program: a stand-in records how it is started."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    seen = tmp_path / "seen"
    fake = bin_dir / "nix-eval-jobs"
    fake.write_text(f"#!/bin/sh\nenv > {seen}.env\nprintf '%s\\n' \"$@\" > {seen}.args\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("CIRCUS_SERVER__SECRET_KEY", MARKER)
    monkeypatch.setenv("CIRCUS_DATABASE__URL", f"postgresql://circus:{MARKER}@db/circus")
    repo = git_repo("nej")
    repo.commit({"flake.nix": '{ outputs = { self }: { hydraJobs = { }; }; }',
                 "release.nix": "{ ... }: { }"})
    for flake in (True, False):
        evaluation = world.evaluate(world.jobset(repo.url, flake=flake,
                                                 expression="hydraJobs" if flake
                                                 else "release.nix"))
        assert evaluation.status is EvaluationStatus.completed, evaluation.error_message
        argv = Path(f"{seen}.args").read_text().splitlines()
        options = {argv[i + 1]: argv[i + 2] for i, arg in enumerate(argv) if arg == "--option"}
        assert options["restrict-eval"] == "true", argv
        if flake:
            assert options["allowed-uris"] == evaluation.flake_ref, argv
        environ = Path(f"{seen}.env").read_text()
        assert MARKER not in environ
        assert "CIRCUS_" not in environ
        assert f"HOME={execution.nix_home(world.settings)}\n" in environ


# ---------------------------------------------------------------------------
# a live server and evaluator on their defaults


@dataclass
class System:
    server: LiveServer
    evaluator: Daemon
    state: Path
    secret_file: Path
    secret_nix: Path
    config_file: Path
    #: evaluator.allowed_path_inputs
    shared: Path
    engine: Engine

    def api(self, method: str, path: str, key: str = ADMIN_KEY,
            json_body: Any = None) -> requests.Response:
        return requests.request(method, self.server.url + path, json=json_body, timeout=30,
                                headers={"Authorization": f"Bearer {key}"})

    def ok(self, method: str, path: str, json_body: Any = None, key: str = ADMIN_KEY) -> Any:
        response = self.api(method, path, key, json_body)
        assert response.status_code < 300, (method, path, response.status_code, response.text)
        return response.json() if response.content else None

    def project(self, name: str, url: str, key: str = ADMIN_KEY) -> None:
        self.ok("POST", "/api/v1/projects", {"name": name, "repository_url": url}, key)

    def jobset(self, project: str, *, key: str = ADMIN_KEY, **values: Any) -> int:
        body = {"name": "main", "branch": "main", **values}
        created = self.ok("POST", f"/api/v1/projects/{project}/jobsets", body, key)
        return int(created["id"])

    def evaluate(self, jobset_id: int) -> dict[str, Any]:
        return evaluate(self.ok, self.evaluator, jobset_id)

    def stored(self) -> str:
        """What the database holds about evaluations and their results, as text."""
        with self.engine.connect() as conn:
            return "\n".join(
                str(row[0]) for table in STORED_TABLES
                for row in conn.execute(text(f"SELECT t::text FROM {table} t")))

    def everything_about(self, evaluation: dict[str, Any], key: str = ADMIN_KEY) -> str:
        """Every API answer that shows what an evaluation produced (to ``key``)."""
        texts = [json.dumps(evaluation)]
        for path in (f"/api/v1/evaluations/{evaluation['id']}",
                     f"/api/v1/evaluations?jobset_id={evaluation['jobset_id']}",
                     f"/api/v1/builds?evaluation_id={evaluation['id']}",
                     "/api/v1/projects",
                     "/api/v1/builds/recent"):
            texts.append(self.api("GET", path, key).text)
        return "\n".join(texts)


@pytest.fixture(scope="module")
def system(engine: Engine, database_url: str, redis_url: str, nix_env: dict[str, str],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    state = tmp_path_factory.mktemp("evalsec")
    secret_file = state / "server-secret.txt"
    secret_file.write_text(MARKER)
    secret_nix = state / "secret.nix"
    secret_nix.write_text(f'"{MARKER}"')
    config_file = state / "circus.toml"
    config_file.write_text(f"# {MARKER}\n[evaluator]\nnix_timeout = 120\n")
    shared = state / "shared"
    shared.mkdir()
    extra = {"CIRCUS_CONFIG_FILE": str(config_file),
             "CIRCUS_SERVER__SECRET_KEY": f"{MARKER}-key",
             # no scheduled evaluations: only the test's triggers
             "CIRCUS_EVALUATOR__POLL_INTERVAL": "3600",
             "CIRCUS_EVALUATOR__ALLOWED_PATH_INPUTS": json.dumps([str(shared)])}
    with live_server(engine, database_url, redis_url, state, USERS, **extra) as server:
        evaluator = Daemon("evaluator", [circus_command("circus-evaluator")],
                           state / "daemon-logs", env={**nix_env, **server.env}, cwd=state)
        evaluator.start()
        try:
            yield System(server, evaluator, state, secret_file, secret_nix, config_file,
                         shared, engine)
        finally:
            evaluator.stop()


def test_a_classic_jobset_cannot_read_server_files_or_environment(system: System) -> None:
    nonce = uuid.uuid4().hex
    private = GitRepo(system.state / f"private-{nonce[:8]}")
    private.commit({"secret.txt": MARKER})
    repo = GitRepo(system.state / f"leaky-{nonce[:8]}")
    (repo.path / "link").symlink_to(system.secret_file)
    (repo.path / "expression.nix").symlink_to(system.secret_nix)
    repo.commit({"release.nix": leaky_release(system.secret_file, system.secret_nix,
                                              system.config_file, private.path),
                 "own.txt": nonce})
    system.project("leaky-classic", repo.url)
    jobset_id = system.jobset("leaky-classic", flake_mode=False, nix_expression="release.nix")

    evaluation = system.evaluate(jobset_id)

    assert evaluation["status"] == "completed", evaluation
    errors = {e["job_name"]: e["message"] for e in evaluation["errors"]}
    for job, path in (("passwd", "/etc/passwd"), ("secretFile", str(system.secret_file)),
                      ("serverConfig", str(system.config_file)),
                      ("importSecret", str(system.secret_nix)), ("listEtc", "/etc"),
                      ("procEnviron", "/proc/self/environ"), ("fetchGit", str(private.path)),
                      ("fetchurl", "/etc/passwd")):
        assert f"access to absolute path '{path}' is forbidden in restricted mode" in (
            errors[job]), (job, errors[job])
    assert (f"access to canonical path '{system.secret_file}' is forbidden in restricted "
            "mode") in errors["symlink"]
    assert "leaked: key=|db=|home=|" in errors["environment"]
    # the positive control: a file of its own input is read
    builds = system.ok("GET", f"/api/v1/builds?evaluation_id={evaluation['id']}")["items"]
    assert [b["job_name"] for b in builds] == ["own"]
    assert builds[0]["drv_path"].endswith(f"-own-{nonce}.drv")
    shown = system.everything_about(evaluation)
    assert MARKER not in shown
    assert PASSWD_CONTENT not in shown
    assert MARKER not in system.stored()
    assert PASSWD_CONTENT not in system.stored()

    # the jobset's expression itself a symlink to a server file (whose parse error
    # would show its text; Nix refuses it too, but the evaluator does not even ask)
    linked = system.jobset("leaky-classic", name="linked", flake_mode=False,
                           nix_expression="expression.nix")
    refused = system.evaluate(linked)
    assert refused["status"] == "failed", refused
    assert refused["error_message"] == "the expression path 'expression.nix' leaves its input"
    assert MARKER not in system.everything_about(refused)
    assert MARKER not in system.stored()


def test_a_flake_cannot_read_server_files_or_environment(system: System) -> None:
    # a repository on the server that is no input of the flake
    private = GitRepo(system.state / f"private-{uuid.uuid4().hex[:8]}")
    private.commit({"secret.txt": MARKER})
    repo = GitRepo(system.state / f"leaky-flake-{uuid.uuid4().hex[:8]}")
    # the flake's own mirror is where Nix may fetch from: walk out of it
    mirror = Mirror.for_url(system.server.env["CIRCUS_EVALUATOR__WORK_DIR"], repo.url,
                            timeout=30, allowed_schemes=["file"]).path
    escape = f"git+file://{mirror}/../../../{private.path.relative_to(system.state)}"
    repo.commit({"flake.nix": leaky_flake(system.secret_file, escape)})
    system.project("leaky-flake", repo.url)
    evaluation = system.evaluate(system.jobset("leaky-flake", flake_mode=True))

    assert evaluation["status"] == "completed", evaluation
    errors = {e["job_name"]: e["message"] for e in evaluation["errors"]}
    assert "access to absolute path '/etc/passwd' is forbidden" in errors["passwd"]
    assert f"access to absolute path '{system.secret_file}' is forbidden" in (
        errors["secretFile"])
    assert "leaked: key=|" in errors["environment"]
    assert f"access to URI '{escape}' is forbidden in restricted mode" in (
        errors["otherRepository"])
    shown = system.everything_about(evaluation)
    assert MARKER not in shown
    assert PASSWD_CONTENT not in shown
    assert MARKER not in system.stored()
    assert PASSWD_CONTENT not in system.stored()


def _refused(response: requests.Response, field: str) -> None:
    assert response.status_code == 403, response.text
    body = response.json()
    assert body["error"] == "server paths need an admin", body
    assert "evaluator.allowed_path_inputs" in json.dumps(body["details"][field]), body


def test_a_non_admin_cannot_name_server_paths(system: System) -> None:
    projects = "/api/v1/projects"
    for url in ("file:///etc", "/etc", "git+file:///etc", f"file://{system.shared}/../"):
        _refused(system.api("POST", projects, MALLORY_KEY,
                            {"name": "m-repo", "repository_url": url}), "repository_url")
    assert system.api("GET", projects + "/m-repo").status_code == 404

    system.project("m-inputs", "https://example.org/m.git", MALLORY_KEY)
    system.jobset("m-inputs", key=MALLORY_KEY, flake_mode=False)
    inputs = projects + "/m-inputs/jobsets/main/inputs"
    for kind, value in (("path", "/etc"), ("path", str(system.secret_file)),
                        ("path", f"{system.shared}/../server-secret.txt"),
                        ("git", "file:///etc main"), ("git", "/srv/repo")):
        _refused(system.api("POST", inputs, MALLORY_KEY,
                            {"name": "x", "input_type": kind, "value": value}), "value")
    # a symlink inside the allowed directory does not lead out of it
    (system.shared / "escape").symlink_to(system.state)
    _refused(system.api("POST", inputs, MALLORY_KEY, {
        "name": "x", "input_type": "path", "value": f"{system.shared}/escape"}), "value")
    updated = system.api("PUT", projects + "/m-inputs", MALLORY_KEY,
                         {"repository_url": "file:///etc"})
    _refused(updated, "repository_url")
    assert system.ok("GET", inputs)["total"] == 0

    # the allowlist, and admins, may
    (system.shared / "data").mkdir()
    system.ok("POST", inputs, {"name": "shared", "input_type": "path",
                               "value": str(system.shared / "data")}, MALLORY_KEY)
    system.ok("POST", inputs, {"name": "etc", "input_type": "path", "value": "/etc"})
    assert system.api("GET", projects + "/m-inputs").json()["repository_url"].startswith(
        "https://")


def _csrf(page: requests.Response) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert found, page.text[:2000]
    return found.group(1)


def test_the_dashboard_refuses_server_paths_to_a_non_admin(system: System) -> None:
    system.project("m-dash", "https://example.org/d.git", MALLORY_KEY)
    system.jobset("m-dash", key=MALLORY_KEY, flake_mode=False)
    browser = requests.Session()
    url = system.server.url
    login = browser.post(url + "/login", timeout=30, data={
        "username": "mallory", "password": MALLORY_PASSWORD, "next": "/",
        "csrf_token": _csrf(browser.get(url + "/login", timeout=30))})
    assert login.status_code == 200, login.text[:2000]
    assert "mallory" in login.text, login.text[:2000]
    token = _csrf(browser.get(url + "/jobset/m-dash/main", timeout=30))

    added = browser.post(url + "/jobset/m-dash/main/inputs", timeout=30, data={
        "name": "etc", "input_type": "path", "value": "/etc", "csrf_token": token})
    assert added.status_code == 403, added.text[:2000]
    assert localsource.refusal("/etc") in html.unescape(added.text)
    settings = browser.post(url + "/project/m-dash/settings", timeout=30, data={
        "description": "", "repository_url": "file:///etc", "csrf_token": token})
    assert settings.status_code == 403, settings.text[:2000]
    assert localsource.refusal("file:///etc") in html.unescape(settings.text)
    assert system.ok("GET", "/api/v1/projects/m-dash/jobsets/main/inputs")["total"] == 0
    assert system.ok("GET", "/api/v1/projects/m-dash")["repository_url"] == (
        "https://example.org/d.git")


def _real_output(nonce: str) -> str:
    expr = (f'derivation {{ name = "circus-vault-{nonce}"; builder = "/bin/sh"; '
            'system = builtins.currentSystem; args = ["-c" "echo vault > $out"]; }')
    return subprocess.run(["nix-build", "--no-out-link", "-E", expr], capture_output=True,
                          text=True, env=nix_environ([]), check=True).stdout.strip()


def test_a_build_input_cannot_read_a_hidden_projects_builds(system: System) -> None:
    nonce = uuid.uuid4().hex
    with Session(system.engine, expire_on_commit=False) as session:
        rows = Rows(session, system.state / "logs")
        root = session.query(User).filter_by(username="root").one()
        vault = rows.project("vault", hidden=True, owner_id=root.id)
        vault_evaluation = rows.evaluation(rows.jobset(vault))
        rows.build(vault_evaluation, "secret", BuildStatus.succeeded,
                   outputs={"out": _real_output(nonce)})
        session.commit()
    repo = GitRepo(system.shared / f"uses-vault-{nonce[:8]}")
    repo.commit({"release.nix": f"""{{ dep, ... }}: {{
  uses = derivation {{
    name = "uses-" + builtins.unsafeDiscardStringContext (baseNameOf dep.outPath);
    system = "{current_system()}"; builder = "/bin/sh"; args = [ "-c" "echo > $out" ]; }};
}}"""})
    build_input = {"name": "dep", "input_type": "build", "value": "vault:main:secret"}

    # mallory's project (its repository is in the allowed directory)
    system.project("m-thief", repo.url, MALLORY_KEY)
    stolen = system.jobset("m-thief", key=MALLORY_KEY, flake_mode=False,
                           nix_expression="release.nix")
    system.ok("POST", "/api/v1/projects/m-thief/jobsets/main/inputs", build_input,
              MALLORY_KEY)
    refused = system.evaluate(stolen)
    assert refused["status"] == "failed", refused
    assert refused["error_message"] == (
        "input 'dep': no successful build of 'vault:main:secret' (no project 'vault' "
        "visible to the owner of project 'm-thief')")
    assert refused["errors"] == []
    assert nonce not in system.everything_about(refused, MALLORY_KEY)
    # ... word for word what a project that does not exist gets
    missing = system.jobset("m-thief", name="missing", key=MALLORY_KEY, flake_mode=False,
                            nix_expression="release.nix")
    system.ok("POST", "/api/v1/projects/m-thief/jobsets/missing/inputs",
              {**build_input, "value": "nosuch:main:secret"}, MALLORY_KEY)
    assert system.evaluate(missing)["error_message"] == refused["error_message"].replace(
        "vault", "nosuch")

    # the positive control: the same jobset in an admin's project reads the build
    system.project("a-reader", repo.url)
    allowed = system.jobset("a-reader", flake_mode=False, nix_expression="release.nix")
    system.ok("POST", "/api/v1/projects/a-reader/jobsets/main/inputs", build_input)
    evaluation = system.evaluate(allowed)
    assert evaluation["status"] == "completed", evaluation
    builds = system.ok("GET", f"/api/v1/builds?evaluation_id={evaluation['id']}")["items"]
    assert [b["job_name"] for b in builds] == ["uses"]
    assert f"circus-vault-{nonce}" in builds[0]["drv_path"]
