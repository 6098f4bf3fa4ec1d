"""``circus up`` in a scratch directory, for the benchmarks that run a whole instance
(``build_overhead.py --e2e``, ``soak.py``): started on a free port, waited for, logged in
to as the admin over the REST API, stopped."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from http.cookiejar import CookieJar
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.helpers.net import free_port  # noqa: E402

CIRCUS = Path(sys.executable).parent / "circus"


class Api:
    """The admin, logged in over the REST API like a browser."""

    def __init__(self, base: str, password: str) -> None:
        self.base = base
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(CookieJar()))
        self.csrf = ""
        self.call("POST", "/api/v1/auth/login", {"username": "admin", "password": password})
        self.csrf = self.call("GET", "/api/v1/auth/csrf")["csrf_token"]

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        request = urllib.request.Request(
            self.base + path, method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "X-CSRFToken": self.csrf})
        with self.opener.open(request, timeout=30) as response:
            return json.load(response)


class CircusUp:
    """``circus up`` with its state in ``root/state`` and its output in
    ``root/circus-up.log``; no ``CIRCUS_*`` variable of the caller reaches it, only
    ``extra_env``."""

    def __init__(self, root: Path, extra_env: dict[str, str] | None = None) -> None:
        self.root = root
        self.state = root / "state"
        self.extra_env = extra_env or {}
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.root / "circus-up.log"

    def start(self, timeout: float = 180) -> Api:
        """Until it says it is running; returns the admin's API session."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("CIRCUS_")}
        env["CIRCUS_SERVER__PORT"] = str(self.port)
        env.update(self.extra_env)
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [str(CIRCUS), "up", "--state-dir", str(self.state)], env=env, cwd=self.root,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while "Circus is running." not in self.log_path.read_text():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("circus up did not start:\n"
                                   + self.log_path.read_text()[-3000:])
            time.sleep(0.5)
        found = re.search(r"login:\s+admin / (\S+)", self.log_path.read_text())
        assert found, self.log_path.read_text()
        return Api(f"http://127.0.0.1:{self.port}", found.group(1))

    def stop(self) -> None:
        """SIGTERM (its daemons stop in order), SIGKILL to the group after 90 s."""
        if self.process is None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
