"""A ``circus up`` instance as tests (and bench/soak.py, bench/build_overhead_e2e.py) drive
it: start it, log in, read its supervisor status."""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from http.cookiejar import CookieJar
from pathlib import Path
from typing import Any

from circus.common.localservices import PrivatePostgres
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


def remove_outside_postgres(state: Path) -> None:
    """Delete the stopped instance's PostgreSQL cluster when it lives outside ``state``
    (/var/lib/circus/postgres-<digest>, for a state under pytest's 0700 base): 50 MB that
    nothing else removes."""
    import shutil

    home = postgres_home(state)
    if not home.is_relative_to(state):
        shutil.rmtree(home, ignore_errors=True)
