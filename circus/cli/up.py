"""``circus up``: a complete single-machine instance.

Starts private PostgreSQL and Redis under the state directory when the config
names none, runs migrations, applies declarative config, starts the server, the
evaluator (beat + worker) and the queue runner, prints the dashboard URL and the
admin login, restarts a daemon that exits (``circus.cli.supervise``), and stops
everything on Ctrl-C / SIGTERM. A second run reuses the state directory
(database, secrets, demo repository); a run while another instance holds the
state directory is refused.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlalchemy.exc
from sqlalchemy.engine import make_url

from circus.cache.publish import signing_key
from circus.cli.supervise import CrashLoop, Supervisor
from circus.common.config import ConfigError, Settings, load_settings
from circus.common.configbase import deep_merge, env_overrides, read_toml
from circus.common.localservices import (
    PrivatePostgres,
    PrivateRedis,
    ServiceError,
    orphaned_clusters,
    tree_size,
)

DEMO_SOURCE = Path(__file__).resolve().parents[2] / "examples" / "demo"
DAEMONS = ("circus-server", "circus-evaluator", "circus-queue-runner")
#: seconds between checks that the private PostgreSQL and Redis still run
SERVICE_CHECK_INTERVAL = 3.0


def user_raw_config(environ: dict[str, str]) -> dict[str, Any]:
    """What the user configured (files and env), to know which keys we may fill in."""
    raw: dict[str, Any] = {}
    local = Path("circus.toml")
    if local.is_file():
        raw = deep_merge(raw, read_toml(local))
    if environ.get("CIRCUS_CONFIG_FILE"):
        raw = deep_merge(raw, read_toml(Path(environ["CIRCUS_CONFIG_FILE"])))
    return deep_merge(raw, env_overrides(environ, "CIRCUS_"))


def configured(raw: dict[str, Any], dotted: str) -> Any | None:
    """The value the user configured at ``dotted`` (None when unset)."""
    node: Any = raw
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def is_set(raw: dict[str, Any], dotted: str) -> bool:
    # a *_file variant counts as set
    return configured(raw, dotted) is not None or configured(raw, f"{dotted}_file") is not None


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


def admin_user(admin_password_file: Path) -> dict[str, Any]:
    return {"username": "admin", "password_file": str(admin_password_file),
            "role": "admin", "full_name": "Circus administrator"}


def admin_login(users: list[Any], admin_password_file: Path) -> list[Any] | None:
    """The declarative users with ``circus up``'s admin login filled in: the admin when
    none is declared, the password of a declared ``admin`` that has none; None when
    the config's users stay as they are."""
    if not users:
        return [admin_user(admin_password_file)]
    for index, user in enumerate(users):
        if isinstance(user, dict) and user.get("username") == "admin" and not (
                user.keys() & {"password", "password_file"}):
            return [*users[:index], {**user, "password_file": str(admin_password_file)},
                    *users[index + 1:]]
    return None


def demo_declarative(repo: Path, admin_password_file: Path) -> dict[str, Any]:
    return {
        "users": [admin_user(admin_password_file)],
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


def state_defaults(state: Path) -> dict[str, str]:
    """Where an instance keeps its files under the state directory unless configured."""
    return {
        "evaluator.work_dir": str(state / "evaluator"),
        "logs.log_dir": str(state / "logs"),
        "cache.cache_dir": str(state / "cache"),
        "gc.gc_roots_dir": str(state / "gcroots"),
    }


class Instance:
    def __init__(self, state: Path, environ: dict[str, str]) -> None:
        self.state = state
        self.environ = environ
        self.postgres: PrivatePostgres | None = None
        self.redis: PrivateRedis | None = None
        self.supervisor: Supervisor | None = None
        self.status_file = state / "supervisor.json"
        #: whether ``circus up`` filled in the ``admin`` login (declared it, or gave the
        #: declared one without a password the state's)
        self.admin_declared = False

    def prepare(self) -> tuple[Settings, dict[str, str]]:
        """Start private services as needed; returns settings and the children's env."""
        state = self.state
        state.mkdir(parents=True, exist_ok=True)
        raw = user_raw_config(self.environ)
        env: dict[str, str] = {}

        if not is_set(raw, "database.url"):
            self.postgres = PrivatePostgres(state / "postgres")
            print(f"starting private PostgreSQL in {self.postgres.directory}", flush=True)
            for home, owner in orphaned_clusters():
                print(f"note: {home} ({tree_size(home) >> 20} MiB) is the PostgreSQL "
                      f"cluster of {owner}, which is gone; remove it (rm -rf {home}) "
                      "unless that directory comes back", flush=True)
            self.postgres.start()
            if self.postgres.outside:
                print(f"  its data lives in {self.postgres.home} (the postgres user cannot "
                      f"reach {state}): remove it too when you remove {state}", flush=True)
            self.postgres.create_database("circus")
            env[env_name("database.url")] = self.postgres.url("circus")
        if not is_set(raw, "broker.url"):
            self.redis = PrivateRedis(state / "redis")
            print(f"starting private Redis in {self.redis.directory}", flush=True)
            self.redis.start()
            env[env_name("broker.url")] = self.redis.url

        for key, value in state_defaults(state).items():
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
        # the admin login is filled in like any other key: a config declaring projects
        # but no users still gets an admin it can log in with, and a declared `admin`
        # without a password (deploy/circus.example.toml) gets the state's; the demo
        # project only comes with no [declarative] at all
        declarative = configured(raw, "declarative")
        if not isinstance(declarative, dict):   # load_settings below reports a bad one
            declarative = {}
        users = admin_login(declarative.get("users") or [], password_file)
        self.admin_declared = users is not None
        if users is not None:
            env["CIRCUS_DECLARATIVE__USERS"] = json.dumps(users)
        if not declarative:
            demo = demo_declarative(prepare_demo_repository(state), password_file)
            env["CIRCUS_DECLARATIVE__PROJECTS"] = json.dumps(demo["projects"])
        env[env_name("server.supervisor_status_file")] = str(self.status_file)
        child_env = {**self.environ, **env}
        settings = load_settings(environ=child_env)
        return settings, child_env

    def start(self, settings: Settings, env: dict[str, str], say: Callable[[str], None]) -> None:
        from circus.cli.migrate import upgrade

        say("applying database migrations")
        upgrade(settings.require_database_url())
        logs = self.state / "daemon-logs"
        logs.mkdir(exist_ok=True)
        bindir = Path(sys.executable).parent
        self.supervisor = Supervisor(env, self.status_file, say)
        for name in DAEMONS:
            self.supervisor.add(name, [str(bindir / name)], logs / f"{name}.log")
        self.supervisor.start_all()

    def wait_healthy(self, url: str, timeout: float = 60) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.supervisor is not None:
                self.supervisor.poll()
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as response:  # noqa: S310
                    if response.status == 200:
                        return True
            except OSError:
                pass
            time.sleep(0.3)
        return False

    def restart_dead_services(self, say: Callable[[str], None]) -> None:
        """Start the private Redis or PostgreSQL again when one died (the daemons
        reconnect by themselves)."""
        for name, service in (("Redis", self.redis), ("PostgreSQL", self.postgres)):
            if service is not None and not service.is_running():
                say(f"the private {name} is not running; starting it again")
                service.start()

    def stop(self) -> None:
        if self.supervisor is not None:
            self.supervisor.stop_all()
        if self.redis is not None:
            self.redis.stop()
        if self.postgres is not None:
            self.postgres.stop()


class Output:
    """What ``circus up`` says, on stdout and in daemon-logs/circus-up.log.

    A reader that went away (``make run | tee log``, then Ctrl-C) must not keep the
    instance from shutting down cleanly: a broken stdout is swapped for /dev/null.
    """

    def __init__(self, log_path: Path) -> None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log = log_path.open("a", encoding="utf-8")

    def __call__(self, message: str, error: bool = False) -> None:
        self.log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")
        self.log.flush()
        stream = sys.stderr if error else sys.stdout
        try:
            print(message, file=stream, flush=True)
        except OSError:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, stream.fileno())
            os.close(devnull)


def take_state_lock(state: Path) -> tuple[int, str] | int:
    """Hold ``state/circus-up.lock`` for the instance's life; (pid, URL) of a holder."""
    state.mkdir(parents=True, exist_ok=True)
    fd = os.open(state / "circus-up.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").split()
        os.close(fd)
        pid = int(holder[0]) if holder and holder[0].isdigit() else 0
        return pid, holder[1] if len(holder) > 1 else "(starting)"
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} (starting)\n".encode(), 0)
    return fd


def port_problem(host: str, port: int) -> str | None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            return (f"port {port} on {host} is taken by another program ({exc.strerror}); "
                    "stop it or choose another port (CIRCUS_SERVER__PORT / server.port)")
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="circus up", description=__doc__)
    parser.add_argument("--state-dir", default=os.environ.get("CIRCUS_STATE_DIR") or ".circus",
                        help="where private services, secrets and data live (default ./.circus)")
    args = parser.parse_args(argv)
    state = Path(args.state_dir).resolve()
    lock = take_state_lock(state)
    if isinstance(lock, tuple):
        pid, url = lock
        print(f"error: another Circus instance (pid {pid}, {url}) is using {state}",
              file=sys.stderr)
        return 1
    say = Output(state / "daemon-logs" / "circus-up.log")
    instance = Instance(state, dict(os.environ))

    stop_requested = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGHUP, request_stop)
    # the user's own config and the port, checked before anything starts: a typo or a
    # taken port (a second `make run`) is reported at once, not after PostgreSQL (initdb
    # in a new state directory) and Redis were started and stopped again
    try:
        own = load_settings(environ=dict(os.environ))
    except ConfigError as exc:
        say(exc.render(), error=True)
        return 2
    taken = port_problem(own.server.host, own.server.port)
    if taken:
        say(f"error: {taken}", error=True)
        return 1
    settings: Settings | None = None
    try:
        settings, env = instance.prepare()
        host = "127.0.0.1" if settings.server.host in ("0.0.0.0", "::") else settings.server.host  # noqa: S104
        url = f"http://{host}:{settings.server.port}"
        os.pwrite(lock, f"{os.getpid()} {url}\n".encode(), 0)
        instance.start(settings, env, say)
    except (ConfigError, ServiceError) as exc:
        say(exc.render() if isinstance(exc, ConfigError) else f"error: {exc}", error=True)
        instance.stop()
        return 2
    except sqlalchemy.exc.OperationalError as exc:
        # a database.url of the user's that does not answer (no such role, server down)
        # (settings is still None when the private services' preparation failed)
        configured_url = (settings or own).database.url
        database = make_url(configured_url).render_as_string(hide_password=True) \
            if configured_url else "(the private PostgreSQL)"
        reason = str(exc.orig).strip() if exc.orig is not None else str(exc)
        say(f"error: cannot connect to the database {database} (database.url): {reason}",
            error=True)
        instance.stop()
        return 2

    try:
        if not instance.wait_healthy(url):
            say(f"Circus did not become healthy; see logs in {state / 'daemon-logs'}",
                error=True)
            instance.stop()
            return 1
        password = (state / "admin-password").read_text().strip()
        login = (f"admin / {password}" if instance.admin_declared
                 else "the users of your [[declarative.users]]")
        key = signing_key(settings)
        cache_key = f"\n  cache key:  {key.public_key()}" if key is not None else ""
        say(f"""
Circus is running.
  dashboard:  {url}/
  API:        {url}/api/v1   (OpenAPI: {url}/api/v1/openapi.json)
  cache:      {url}/nix-cache{cache_key}
  login:      {login}
  state:      {state}  (daemon logs in {state / 'daemon-logs'})
Press Ctrl-C to stop.""")
        assert instance.supervisor is not None
        services_checked = time.monotonic()
        while not stop_requested:
            instance.supervisor.poll()
            if time.monotonic() - services_checked > SERVICE_CHECK_INTERVAL:
                instance.restart_dead_services(say)
                services_checked = time.monotonic()
            time.sleep(0.5)
    except (CrashLoop, ServiceError) as exc:
        say(f"error: {exc}", error=True)
        instance.stop()
        return 1
    say("stopping Circus ...")
    instance.stop()
    return 0
