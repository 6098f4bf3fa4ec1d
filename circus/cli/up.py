"""``circus up``: a complete single-machine instance.

Starts private PostgreSQL and Redis under the state directory when the config
names none, runs migrations, applies declarative config, starts the server, the
evaluator (beat + worker) and the queue runner, prints the dashboard URL and the
admin login, and stops everything on Ctrl-C / SIGTERM. A second run reuses the
state directory (database, secrets, demo repository).
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from circus.common.config import ConfigError, Settings, load_settings
from circus.common.configbase import deep_merge, env_overrides, read_toml
from circus.common.localservices import PrivatePostgres, PrivateRedis, ServiceError

DEMO_SOURCE = Path(__file__).resolve().parents[2] / "examples" / "demo"
DAEMONS = ("circus-server", "circus-evaluator", "circus-queue-runner")


def user_raw_config(environ: dict[str, str]) -> dict[str, Any]:
    """What the user configured (files and env), to know which keys we may fill in."""
    raw: dict[str, Any] = {}
    local = Path("circus.toml")
    if local.is_file():
        raw = deep_merge(raw, read_toml(local))
    if environ.get("CIRCUS_CONFIG_FILE"):
        raw = deep_merge(raw, read_toml(Path(environ["CIRCUS_CONFIG_FILE"])))
    return deep_merge(raw, env_overrides(environ, "CIRCUS_"))


def is_set(raw: dict[str, Any], dotted: str) -> bool:
    node: Any = raw
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            # a *_file variant counts as set
            return isinstance(node, dict) and f"{part}_file" in node
        node = node[part]
    return True


def env_name(dotted: str) -> str:
    return "CIRCUS_" + "__".join(p.upper() for p in dotted.split("."))


def secret_in(state: Path, name: str, make: Any) -> str:
    path = state / name
    if not path.exists():
        path.write_text(make())
        path.chmod(0o600)
    return path.read_text().strip()


def prepare_demo_repository(state: Path) -> Path:
    """A git repository holding the demo flake (flakes only see committed files)."""
    repo = state / "demo-repo"
    if (repo / ".git").exists():
        return repo
    shutil.copytree(DEMO_SOURCE, repo, dirs_exist_ok=True)
    env = {**os.environ, "GIT_AUTHOR_NAME": "Circus", "GIT_AUTHOR_EMAIL": "circus@localhost",
           "GIT_COMMITTER_NAME": "Circus", "GIT_COMMITTER_EMAIL": "circus@localhost"}
    for argv in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"],
                 ["git", "commit", "-q", "-m", "Circus demo flake"]):
        subprocess.run(argv, cwd=repo, check=True, env=env)
    return repo


def demo_declarative(repo: Path, admin_password_file: Path) -> dict[str, Any]:
    return {
        "users": [{"username": "admin", "password_file": str(admin_password_file),
                   "role": "admin", "full_name": "Circus administrator"}],
        "projects": [{
            "name": "demo",
            "description": "Demo flake shipped with Circus (examples/demo)",
            "repository_url": f"file://{repo}",
            "jobsets": [{"name": "main", "branch": "main", "nix_expression": "hydraJobs",
                         "check_interval": 60}],
            "channels": [{"name": "demo-main", "jobset": "main"}],
            "members": [{"username": "admin", "role": "admin"}],
        }],
    }


class Instance:
    def __init__(self, state: Path, environ: dict[str, str]) -> None:
        self.state = state
        self.environ = environ
        self.postgres: PrivatePostgres | None = None
        self.redis: PrivateRedis | None = None
        self.children: list[subprocess.Popen[bytes]] = []

    def prepare(self) -> tuple[Settings, dict[str, str]]:
        """Start private services as needed; returns settings and the children's env."""
        state = self.state
        state.mkdir(parents=True, exist_ok=True)
        raw = user_raw_config(self.environ)
        env: dict[str, str] = {}

        if not is_set(raw, "database.url"):
            self.postgres = PrivatePostgres(state / "postgres")
            print(f"starting private PostgreSQL in {self.postgres.directory}", flush=True)
            self.postgres.start()
            self.postgres.create_database("circus")
            env[env_name("database.url")] = self.postgres.url("circus")
        if not is_set(raw, "broker.url"):
            self.redis = PrivateRedis(state / "redis")
            print(f"starting private Redis in {self.redis.directory}", flush=True)
            self.redis.start()
            env[env_name("broker.url")] = self.redis.url

        defaults = {
            "evaluator.work_dir": str(state / "evaluator"),
            "logs.log_dir": str(state / "logs"),
            "cache.cache_dir": str(state / "cache"),
            "gc.gc_roots_dir": str(state / "gcroots"),
        }
        for key, value in defaults.items():
            if not is_set(raw, key):
                env[env_name(key)] = value
        if not is_set(raw, "server.secret_key"):
            secret_in(state, "secret-key", lambda: secrets.token_hex(32))
            env[env_name("server.secret_key") + "_FILE"] = str(state / "secret-key")
        if not is_set(raw, "nix.substituters"):
            # a single machine without network: never wait for cache.nixos.org
            env[env_name("nix.substituters")] = "[]"
        if not is_set(raw, "signing.key") and not is_set(raw, "signing.enabled"):
            key_file = state / "signing-key"
            if not key_file.exists():
                from circus.common.nix.signing import generate_key_pair

                secret, public = generate_key_pair("circus-local-1")
                key_file.write_text(secret)
                key_file.chmod(0o600)
                (state / "signing-key.pub").write_text(public)
            env[env_name("signing.enabled")] = "true"
            env[env_name("signing.key") + "_FILE"] = str(key_file)

        password_file = state / "admin-password"
        secret_in(state, "admin-password", lambda: secrets.token_urlsafe(12))
        has_declarative = bool(raw.get("declarative"))
        if not has_declarative:
            import json

            repo = prepare_demo_repository(state)
            env["CIRCUS_DECLARATIVE__USERS"] = json.dumps(
                demo_declarative(repo, password_file)["users"])
            env["CIRCUS_DECLARATIVE__PROJECTS"] = json.dumps(
                demo_declarative(repo, password_file)["projects"])
        child_env = {**self.environ, **env}
        settings = load_settings(environ=child_env)
        return settings, child_env

    def start(self, settings: Settings, env: dict[str, str]) -> None:
        from circus.cli.migrate import upgrade

        print("applying database migrations", flush=True)
        upgrade(settings.require_database_url())
        logs = self.state / "daemon-logs"
        logs.mkdir(exist_ok=True)
        bindir = Path(sys.executable).parent
        for name in DAEMONS:
            log = (logs / f"{name}.log").open("ab")
            self.children.append(subprocess.Popen(
                [str(bindir / name)], env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True))
            log.close()

    def wait_healthy(self, url: str, timeout: float = 60) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(child.poll() is not None for child in self.children):
                return False
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as response:  # noqa: S310
                    if response.status == 200:
                        return True
            except OSError:
                pass
            time.sleep(0.3)
        return False

    def stop(self) -> None:
        for child in self.children:
            if child.poll() is None:
                try:
                    os.killpg(child.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 30
        for child in self.children:
            try:
                child.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
        if self.redis is not None:
            self.redis.stop()
        if self.postgres is not None:
            self.postgres.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="circus up", description=__doc__)
    parser.add_argument("--state-dir", default=os.environ.get("CIRCUS_STATE_DIR") or ".circus",
                        help="where private services, secrets and data live (default ./.circus)")
    args = parser.parse_args(argv)
    state = Path(args.state_dir).resolve()
    instance = Instance(state, dict(os.environ))

    stop_requested = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        settings, env = instance.prepare()
        instance.start(settings, env)
    except (ConfigError, ServiceError) as exc:
        print(exc.render() if isinstance(exc, ConfigError) else f"error: {exc}", file=sys.stderr)
        instance.stop()
        return 2

    host = "127.0.0.1" if settings.server.host in ("0.0.0.0", "::") else settings.server.host  # noqa: S104
    url = f"http://{host}:{settings.server.port}"
    if not instance.wait_healthy(url):
        print(f"Circus did not become healthy; see logs in {state / 'daemon-logs'}",
              file=sys.stderr)
        instance.stop()
        return 1
    password = (state / "admin-password").read_text().strip()
    print(f"""
Circus is running.
  dashboard:  {url}/
  API:        {url}/api/v1   (OpenAPI: {url}/api/v1/openapi.json)
  cache:      {url}/nix-cache
  login:      admin / {password}
  state:      {state}  (daemon logs in {state / 'daemon-logs'})
Press Ctrl-C to stop.""", flush=True)
    while not stop_requested:
        for child in instance.children:
            if child.poll() is not None:
                print(f"a daemon exited with {child.returncode}; stopping "
                      f"(logs in {state / 'daemon-logs'})", file=sys.stderr)
                stop_requested = True
        time.sleep(0.5)
    print("stopping Circus ...", flush=True)
    instance.stop()
    return 0
