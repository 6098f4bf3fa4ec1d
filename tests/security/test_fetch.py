"""Evaluation fetches nothing from internal hosts (server-side request forgery).

mallory holds only ``create-projects``. She makes projects over the HTTP API
whose repository (or git input, or flake input, or Nix code) points at a
listener on 127.0.0.1 — the evaluator's loopback, standing for any internal
host — and a real ``circus-evaluator`` next to a ``circus-server`` evaluates
them. The listener must see no connection, and the evaluation must say why.

127.0.0.2 plays the company's own git server: ``server.outbound_allowlist``
names it, so what is served there is fetched (the controls: the same kinds of
URL do connect when allowed, so these tests can fail). It also answers
``/redirect/...`` with a 302 to the listener on 127.0.0.1.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import socket
import subprocess
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import Engine

from circus.common import outbound
from circus.common.config import load_settings
from circus.common.configbase import ConfigError
from circus.common.nix.environment import current_system, nix_environ
from circus.common.outbound import Allowlist
from circus.evaluator import remotes
from circus.evaluator.git import GitError, Mirror
from tests.api.live import ADMIN_KEY, LiveServer, live_server
from tests.helpers.daemons import Daemon, circus_command
from tests.helpers.gitrepo import GIT_ENV, GitRepo
from tests.security.web_support import evaluate

MALLORY_KEY = "mallory-create-projects-key-0123456789"
USERS = {"users": [{"username": "root", "role": "admin"},
                   {"username": "mallory", "role": "create-projects"}],
         "api_keys": [{"name": "live-admin", "key": ADMIN_KEY, "role": "admin",
                       "owner": "root"},
                      {"name": "mallory", "key": MALLORY_KEY, "role": "create-projects",
                       "owner": "mallory"}]}
INTERNAL = "127.0.0.2"
ALLOW_HINT = "add it to server.outbound_allowlist to allow it"
#: what the refusal of ``localhost`` names: its first address here (/etc/hosts decides)
LOCALHOST = str(outbound.resolve("localhost", 80)[0])


class Trap:
    """A TCP listener that records every connection and what the peer sent first."""

    def __init__(self, host: str, port: int = 0) -> None:
        self.sock = socket.create_server((host, port))
        self.port = self.sock.getsockname()[1]
        self.seen: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                first = b""
                try:
                    # what arrives together: git writes a pkt-line's length and its text
                    # apart, and under load they arrive apart (b"003b", then the request)
                    first = conn.recv(300)
                    conn.settimeout(0.3)
                    while first and len(first) < 300:
                        more = conn.recv(300 - len(first))
                        if not more:
                            break
                        first += more
                except OSError:
                    pass
                self.seen.append(first or b"(nothing)")

    def mark(self) -> int:
        """Where the connections a test is about begin."""
        return len(self.seen)

    def close(self) -> None:
        self.sock.close()


class GitHost:
    """Dumb-HTTP git server (and plain files) on the allow-listed address."""

    def __init__(self, root: Path, trap: Trap) -> None:
        self.root = root
        trap_port = trap.port

        class Handler(SimpleHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.startswith("/redirect/"):
                    self.send_response(302)
                    self.send_header("Location", f"http://127.0.0.1:{trap_port}/"
                                     + self.path.removeprefix("/redirect/"))
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                super().do_GET()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((INTERNAL, 0), partial(Handler, directory=str(root)))
        self.url = f"http://{INTERNAL}:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def publish(self, repo: GitRepo, name: str) -> str:
        """Serve ``repo`` as ``<url>/<name>.git``; returns that URL."""
        bare = self.root / f"{name}.git"
        shutil.rmtree(bare, ignore_errors=True)
        env = {**GIT_ENV, "PATH": "/usr/bin:/bin"}
        for argv in (["git", "clone", "-q", "--bare", str(repo.path), str(bare)],
                     ["git", "--git-dir", str(bare), "update-server-info"]):
            subprocess.run(argv, check=True, env=env, capture_output=True)
        return f"{self.url}/{name}.git"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class System:
    server: LiveServer
    evaluator: Daemon
    state: Path
    trap: Trap
    internal_trap: Trap
    host: GitHost
    #: jobset id -> its project's name
    projects: dict[int, str] = field(default_factory=dict)

    def api(self, method: str, path: str, key: str, json_body: Any = None
            ) -> requests.Response:
        return requests.request(method, self.server.url + path, json=json_body, timeout=30,
                                headers={"Authorization": f"Bearer {key}"})

    def ok(self, method: str, path: str, json_body: Any = None, key: str = MALLORY_KEY) -> Any:
        response = self.api(method, path, key, json_body)
        assert response.status_code < 300, (method, path, response.status_code, response.text)
        return response.json() if response.content else None

    def jobset(self, url: str, **values: Any) -> int:
        """mallory's new project with repository ``url`` and a jobset ``main``."""
        name = f"m-{uuid.uuid4().hex[:10]}"
        self.ok("POST", "/api/v1/projects", {"name": name, "repository_url": url})
        body = {"name": "main", "branch": "main", **values}
        created = self.ok("POST", f"/api/v1/projects/{name}/jobsets", body)
        self.projects[int(created["id"])] = name
        return int(created["id"])

    def add_git_input(self, jobset_id: int, name: str, value: str) -> None:
        self.ok("POST", f"/api/v1/projects/{self.projects[jobset_id]}/jobsets/main/inputs",
                {"name": name, "input_type": "git", "value": value})

    def evaluate(self, jobset_id: int) -> dict[str, Any]:
        return evaluate(self.ok, self.evaluator, jobset_id)

    def repo(self, files: dict[str, str]) -> GitRepo:
        repo = GitRepo(self.state / f"repo-{uuid.uuid4().hex[:10]}")
        repo.commit(files)
        return repo


@pytest.fixture(scope="module")
def system(engine: Engine, database_url: str, redis_url: str, nix_env: dict[str, str],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[System]:
    state = tmp_path_factory.mktemp("fetchsec")
    trap, internal_trap = Trap("127.0.0.1"), Trap(INTERNAL)
    (state / "served").mkdir()
    host = GitHost(state / "served", trap)
    extra = {"CIRCUS_EVALUATOR__POLL_INTERVAL": "3600",
             "CIRCUS_EVALUATOR__NIX_TIMEOUT": "120",
             "CIRCUS_EVALUATOR__GIT_TIMEOUT": "20",
             "CIRCUS_SERVER__OUTBOUND_ALLOWLIST": json.dumps([INTERNAL]),
             # the admin lets Nix code fetch from the company's server, and (by mistake)
             # from the loopback listener: the outbound rule leaves that prefix out
             "CIRCUS_EVALUATOR__ALLOWED_URIS": json.dumps(
                 [f"{host.url}/", f"http://127.0.0.1:{trap.port}/"])}
    try:
        with live_server(engine, database_url, redis_url, state, USERS, **extra) as server:
            evaluator = Daemon("evaluator", [circus_command("circus-evaluator")],
                               state / "daemon-logs", env={**nix_env, **server.env},
                               cwd=state)
            evaluator.start()
            try:
                yield System(server, evaluator, state, trap, internal_trap, host)
            finally:
                evaluator.stop()
    finally:
        host.close()
        trap.close()
        internal_trap.close()


def flake_with_job(nonce: str) -> str:
    return f"""{{ outputs = {{ self }}: {{ hydraJobs.ok = derivation {{
  name = "ok-{nonce}"; system = "{current_system()}"; builder = "/bin/sh";
  args = [ "-c" "echo > $out" ]; }}; }}; }}"""


def refusal(url: str, host: str, address: str, kind: str = "a loopback address") -> str:
    return (f"fetching {url} refused: {host} resolves to {kind} ({address}); {ALLOW_HINT}")


def test_repositories_and_git_inputs_on_internal_addresses_are_never_contacted(
        system: System) -> None:
    port, mark = system.trap.port, system.trap.mark()
    attacks = {
        f"http://127.0.0.1:{port}/r.git": ("127.0.0.1", "127.0.0.1"),
        f"http://localhost:{port}/r.git": ("localhost", LOCALHOST),
        f"ssh://git@127.0.0.1:{port}/r.git": ("127.0.0.1", "127.0.0.1"),
        f"ssh://git@localhost:{port}/r.git": ("localhost", LOCALHOST),
        f"git://localhost:{port}/r.git": ("localhost", LOCALHOST),
    }
    for url, (host, address) in attacks.items():
        evaluation = system.evaluate(system.jobset(url))
        assert evaluation["status"] == "failed", evaluation
        assert evaluation["error_message"] == refusal(url, host, address), evaluation
    metadata = "http://169.254.169.254/latest/meta-data/"
    evaluation = system.evaluate(system.jobset(metadata))
    assert evaluation["error_message"] == refusal(
        metadata, "169.254.169.254", "169.254.169.254", "a cloud metadata address")

    # git inputs of a classic jobset whose repository is on the allow-listed server
    served = system.host.publish(system.repo({"release.nix": "{ dep, ... }: { }"}),
                                 "classic")
    for url, host, address in ((f"http://127.0.0.1:{port}/dep.git", "127.0.0.1", "127.0.0.1"),
                               ("git@localhost:private.git", "localhost", LOCALHOST)):
        classic = system.jobset(served, flake_mode=False, nix_expression="release.nix")
        system.add_git_input(classic, "dep", f"{url} main")
        evaluation = system.evaluate(classic)
        assert evaluation["status"] == "failed", evaluation
        assert evaluation["error_message"] == refusal(url, host, address), evaluation

    # a URL on the allow-listed server that redirects to the listener
    redirect = f"{system.host.url}/redirect/r.git"
    evaluation = system.evaluate(system.jobset(redirect))
    assert evaluation["status"] == "failed", evaluation
    assert "returned error: 302" in evaluation["error_message"], evaluation

    assert system.trap.seen[mark:] == []


def test_allow_listed_git_servers_are_fetched(system: System) -> None:
    """The controls: allowed, the same kinds of URL connect, and a repository is
    evaluated."""
    nonce = uuid.uuid4().hex
    url = system.host.publish(system.repo({"flake.nix": flake_with_job(nonce)}),
                              f"ok-{nonce[:6]}")
    evaluation = system.evaluate(system.jobset(url))
    assert evaluation["status"] == "completed", evaluation
    builds = system.ok("GET", f"/api/v1/builds?evaluation_id={evaluation['id']}")["items"]
    assert [b["drv_path"].endswith(f"-ok-{nonce}.drv") for b in builds] == [True]

    port = system.internal_trap.port
    for url, greeting in ((f"ssh://git@{INTERNAL}:{port}/r.git", b"SSH-2.0-"),
                          (f"git://{INTERNAL}:{port}/r.git", b"git-upload-pack /r.git"),
                          (f"http://{INTERNAL}:{port}/r.git", b"GET /r.git/info/refs")):
        before = len(system.internal_trap.seen)
        evaluation = system.evaluate(system.jobset(url))
        assert evaluation["status"] == "failed", evaluation
        assert "refused" not in evaluation["error_message"], evaluation
        assert any(greeting in seen for seen in system.internal_trap.seen[before:]), (
            url, system.internal_trap.seen)


FETCHES = {
    "fetchTree": 'builtins.fetchTree "git+http://127.0.0.1:@PORT@/x.git"',
    "fetchGit": 'builtins.fetchGit "http://localhost:@PORT@/x.git"',
    "fetchurl": 'builtins.fetchurl "http://127.0.0.1:@PORT@/x"',
    "fetchTarball": 'builtins.fetchTarball "http://127.0.0.1:@PORT@/x.tar.gz"',
    "fetchurlMetadata": 'builtins.fetchurl "http://169.254.169.254/latest/meta-data/"',
    # the company's server, which allowed_uris names: fetched (the control)
    "allowed": 'builtins.fetchurl "@HOST@/allowed.txt"',
}


def _jobs(port: int, host: str) -> str:
    return "\n".join(
        f'  {name} = throw "fetched: ${{builtins.readFile ({code})}}";'
        for name, code in FETCHES.items()).replace("@PORT@", str(port)).replace("@HOST@", host)


def _fetch_errors(evaluation: dict[str, Any], port: int, host: str) -> None:
    assert evaluation["status"] == "completed", evaluation
    errors = {e["job_name"]: e["message"] for e in evaluation["errors"]}
    for name, code in FETCHES.items():
        if name == "allowed":
            continue
        uri = code.split('"')[1].replace("@PORT@", str(port))
        assert f"access to URI '{uri}' is forbidden in restricted mode" in errors[name], (
            name, errors[name])
    assert f"fetched: {host}" in errors["allowed"], errors["allowed"]


def test_nix_code_cannot_fetch_from_internal_addresses(system: System) -> None:
    port, host, mark = system.trap.port, system.host.url, system.trap.mark()
    (system.host.root / "allowed.txt").write_text(host)
    flake = system.repo({"flake.nix": "{ outputs = { self }: { hydraJobs = {\n"
                                      + _jobs(port, host) + "\n}; }; }"})
    evaluation = system.evaluate(system.jobset(system.host.publish(flake, "code-flake")))
    _fetch_errors(evaluation, port, host)

    classic = system.repo({"release.nix": "{ ... }: {\n" + _jobs(port, host) + "\n}"})
    evaluation = system.evaluate(system.jobset(
        system.host.publish(classic, "code-classic"), flake_mode=False,
        nix_expression="release.nix"))
    _fetch_errors(evaluation, port, host)
    assert system.trap.seen[mark:] == []


EVIL_LOCK = {"nodes": {
    "evil": {"flake": False,
             "locked": {"lastModified": 1, "rev": "0123456789abcdef0123456789abcdef01234567",
                        "narHash": "sha256-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
                        "revCount": 1, "type": "git", "url": "@URL@"},
             "original": {"type": "git", "url": "@URL@"}},
    "root": {"inputs": {"evil": "evil"}}}, "root": "root", "version": 7}


def test_a_flake_input_on_an_internal_address_is_refused_before_nix_runs(
        system: System) -> None:
    port, mark = system.trap.port, system.trap.mark()
    for url, host, address, via in (
            (f"http://127.0.0.1:{port}/x.git", "127.0.0.1", "127.0.0.1", "git+"),
            (f"http://localhost:{port}/x.tar.gz", "localhost", LOCALHOST, "")):
        lock = json.dumps(EVIL_LOCK).replace("@URL@", url)
        if not via:
            lock = lock.replace('"type": "git"', '"type": "tarball"')
        flake = system.repo({
            "flake.nix": f"""{{ inputs.evil = {{ url = "{via}{url}"; flake = false; }};
  outputs = {{ self, evil }}: {{ hydraJobs.x = builtins.readFile "${{evil}}/a"; }}; }}""",
            "flake.lock": lock})
        evaluation = system.evaluate(system.jobset(
            system.host.publish(flake, f"lock-{uuid.uuid4().hex[:6]}")))
        assert evaluation["status"] == "failed", evaluation
        assert evaluation["error_message"] == (
            f"refused to fetch the flake's inputs: flake input 'evil' ({url}): refused: "
            f"{host} resolves to a loopback address ({address}); {ALLOW_HINT}"), evaluation
    assert system.trap.seen[mark:] == []

    # the control: an input on the company's server is fetched through the same rule
    nonce = uuid.uuid4().hex
    dep = system.host.publish(system.repo({"a": nonce}), f"dep-{nonce[:6]}")
    flake = system.repo({"flake.nix": f"""{{
  inputs.dep = {{ url = "git+{dep}?ref=main"; flake = false; }};
  outputs = {{ self, dep }}: {{ hydraJobs.ok = derivation {{
    name = "dep-" + builtins.readFile "${{dep}}/a"; system = "{current_system()}";
    builder = "/bin/sh"; args = [ "-c" "echo > $out" ]; }}; }}; }}"""})
    locked = subprocess.run(["nix", "flake", "lock"], cwd=flake.path, capture_output=True,
                            text=True, env={**nix_environ([]), **GIT_ENV,
                                            "HOME": str(system.state)})
    assert locked.returncode == 0, locked.stderr
    flake.commit()
    evaluation = system.evaluate(system.jobset(system.host.publish(flake, "lock-ok")))
    assert evaluation["status"] == "completed", evaluation
    builds = system.ok("GET", f"/api/v1/builds?evaluation_id={evaluation['id']}")["items"]
    assert [b["drv_path"].endswith(f"-dep-{nonce}.drv") for b in builds] == [True]


@pytest.mark.parametrize("url", ["http://localhost:{port}/r.git",
                                 "ssh://git@localhost:{port}/r.git",
                                 "git://localhost:{port}/r.git"])
def test_git_connects_to_the_address_that_was_checked(
        url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """DNS rebinding: the check's lookup answers the allow-listed 127.0.0.2, any later
    lookup the system's 127.0.0.1. Git must reach the first (real git and ssh, this
    process's evaluator code; the lookup is the one function standing in for DNS)."""
    internal = Trap(INTERNAL)
    port = internal.port
    # the same port on 127.0.0.1: a lookup of git's own would take it there
    loopback = Trap("127.0.0.1", port)
    try:
        monkeypatch.setattr(outbound, "resolve", lambda host, port: [
            ipaddress.ip_address(INTERNAL)] if host == "localhost" else [])
        mirror = Mirror.for_url(tmp_path, url.format(port=port), timeout=10,
                                allowed_schemes=["http", "ssh", "git"],
                                allowlist=Allowlist.parse([INTERNAL]))
        with pytest.raises(GitError):
            mirror.fetch("main")  # the trap answers no git: the fetch fails after connecting
        assert internal.seen, "git did not connect to the checked address"
        assert loopback.seen == []
    finally:
        internal.close()
        loopback.close()


def test_allowed_uris_must_name_a_host() -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(files=[], environ={}, overrides={"evaluator": {"allowed_uris": [
            "https://github.com/", "https://", "git+http://", "github:NixOS/", "http:/x"]}})
    assert [p.path for p in raised.value.problems] == [
        "evaluator.allowed_uris.1", "evaluator.allowed_uris.2", "evaluator.allowed_uris.4"]
    assert "must name a host (scheme://host/...), got 'https://'" in (
        raised.value.problems[0].message)


def test_every_kind_of_locked_flake_input_is_checked() -> None:
    """The lock file kinds the live test does not write: forges with their own host,
    ssh and file URLs, paths, and hosts git and Python could read differently."""
    lock = {"nodes": {
        "enterprise": {"locked": {"type": "github", "owner": "o", "repo": "r",
                                  "host": "127.0.0.1:8443"}},
        "lab": {"original": {"type": "gitlab", "owner": "o", "repo": "r",
                             "host": "localhost"}},
        "ssh": {"locked": {"type": "git", "url": "ssh://git@[::1]/private.git"}},
        "file": {"locked": {"type": "file", "url": "file+http://169.254.169.254/x"}},
        "sneaky": {"locked": {"type": "git", "url": "http://127.0.0.1:1\\@example.com/"}},
        "local": {"locked": {"type": "path", "path": "/srv/x"}},
        "mine": {"locked": {"type": "git", "url": "http://127.0.0.2/ok.git"}},
        "root": {"inputs": {}}}, "root": "root", "version": 7}
    problems = remotes.flake_input_problems(json.dumps(lock), Allowlist.parse([INTERNAL]))
    assert problems == [
        "flake input 'enterprise' (https://127.0.0.1:8443/): refused: 127.0.0.1 resolves "
        f"to a loopback address (127.0.0.1); {ALLOW_HINT}",
        "flake input 'file' (file+http://169.254.169.254/x): refused: 169.254.169.254 "
        f"resolves to a cloud metadata address (169.254.169.254); {ALLOW_HINT}",
        "flake input 'lab' (https://localhost/): refused: localhost resolves to a loopback "
        f"address ({LOCALHOST}); {ALLOW_HINT}",
        "flake input 'sneaky' (http://127.0.0.1:1\\@example.com/): "
        "'http://127.0.0.1:1\\\\@example.com/' is not a valid URL (host part)",
        f"flake input 'ssh' (ssh://git@[::1]/private.git): refused: ::1 resolves to a "
        f"loopback address (::1); {ALLOW_HINT}"]
