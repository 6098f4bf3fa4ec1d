"""A ``circus up`` instance as tests (and bench/soak.py, bench/build_overhead_e2e.py) drive
it: start it, log in, read its supervisor status."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from http.cookiejar import CookieJar
from pathlib import Path
from typing import Any

from circus.common.localservices import PrivatePostgres, PrivateRedis
from tests.helpers.daemons import Daemon, circus_command, wait_until


class Client:
    """A logged-in browser-like client of the instance's REST API."""

    def __init__(self, base: str, password: str) -> None:
        self.base = base
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(CookieJar()))
        self.csrf = ""
        self.post("/api/v1/auth/login", {"username": "admin", "password": password})
        self.csrf = self.get("/api/v1/auth/csrf")["csrf_token"]

    def post(self, path: str, body: dict[str, Any]) -> Any:
        request = urllib.request.Request(self.base + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json",
                                                  "X-CSRFToken": self.csrf})
        with self.opener.open(request, timeout=10) as response:
            return json.load(response)

    def get(self, path: str) -> Any:
        with self.opener.open(self.base + path, timeout=10) as response:
            return json.load(response)

    def text(self, path: str) -> str | None:
        """The body, or None for a 404."""
        try:
            with self.opener.open(self.base + path, timeout=10) as response:
                return str(response.read().decode())
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise


def start(state: Path, port: int, log_dir: Path,
          extra_env: Mapping[str, str] | None = None) -> tuple[Daemon, str, float]:
    """``circus up`` on ``state``; (daemon, admin password, seconds until it was ready)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CIRCUS_")}
    env["CIRCUS_SERVER__PORT"] = str(port)
    env.update(extra_env or {})
    started = time.monotonic()
    daemon = Daemon(f"circus-up-{len(list(log_dir.glob('circus-up-*.log')))}",
                    [circus_command("circus"), "up", "--state-dir", str(state)], log_dir,
                    env=env, cwd=state.parent).start()
    try:
        wait_until(lambda: "Circus is running." in daemon.log() or not daemon.alive(),
                   timeout=180, message="circus up ready")
        assert daemon.alive(), daemon.log()
        match = re.search(r"login:\s+admin / (\S+)", daemon.log())
        assert match, daemon.log()
    except BaseException:
        daemon.stop()   # whatever it started must not outlive the failed start
        raise
    return daemon, match.group(1), time.monotonic() - started


def pids_of(state: Path) -> dict[str, int]:
    """The running daemons' pids, from the supervisor's status file."""
    status = json.loads((state / "supervisor.json").read_text())
    return {name: info["pid"] for name, info in status["daemons"].items() if info["pid"]}


def health(base: str) -> Any:
    with urllib.request.urlopen(base + "/health", timeout=10) as response:
        return json.load(response)


def health_ok(base: str) -> bool:
    try:
        answer = health(base)
    except OSError:
        return False
    return bool(answer["database"]["ok"] and answer["broker"]["ok"])


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purpose
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(") ")[-1][:1] != "Z"


def postgres_home(state: Path) -> Path:
    """Where ``circus up``'s PostgreSQL lives (elsewhere when postgres cannot reach state)."""
    return PrivatePostgres(state / "postgres").home


def remove_instance(state: Path) -> None:
    """Remove everything of the ``circus up`` instance on ``state``: stop what it left
    running (pg_ctl's PostgreSQL outlives a kill -9 of ``circus up``; Redis too), then
    delete its PostgreSQL cluster wherever it lives (/var/lib/circus/postgres-<digest>
    when the postgres user cannot reach ``state``, 50 MB that nothing else removes) and
    the state directory."""
    redis = PrivateRedis(state / "redis")
    try:
        pid = int(redis.pid_file.read_text().strip())
        # a pid file left by a kill -9 may name another process by now
        if str(redis.socket).encode() + b"\0" in Path(f"/proc/{pid}/cmdline").read_bytes():
            os.kill(pid, signal.SIGTERM)
    except (OSError, ValueError):
        pass
    PrivatePostgres(state / "postgres").remove()
    shutil.rmtree(state, ignore_errors=True)


@contextmanager
def removed_afterwards(*states: Path) -> Iterator[None]:
    """``remove_instance`` of each state directory when the block ends, however."""
    try:
        yield
    finally:
        for state in states:
            remove_instance(state)


@contextmanager
def instance_root(name: str, keep_logs_in: Path | None = None) -> Iterator[Path]:
    """A directory for ``circus up`` state directories that the postgres user can reach
    (under /tmp, 0755; pytest's base directory is 0700), so that each instance's cluster
    lives inside its state directory. Afterwards every instance in it is removed
    (``remove_instance``), then the directory; the daemons' logs are copied to
    ``keep_logs_in`` first (pytest's tmp_path, kept for a failed run)."""
    root = Path(tempfile.mkdtemp(prefix=f"circus-{name}-", dir="/tmp"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        for state in sorted({lock.parent for lock in root.glob("*/circus-up.lock")}
                            | {p.parent for p in root.glob("*/postgres")}):
            if keep_logs_in is not None and (state / "daemon-logs").is_dir():
                shutil.copytree(state / "daemon-logs",
                                keep_logs_in / f"{state.name}-daemon-logs", dirs_exist_ok=True)
            remove_instance(state)
        shutil.rmtree(root, ignore_errors=True)
