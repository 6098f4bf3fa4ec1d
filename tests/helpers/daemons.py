"""Run Circus daemons (and other servers) as real subprocesses in tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

VENV_BIN = Path(sys.executable).parent


class Daemon:
    """A subprocess with its output in a log file, stopped (whole group) on exit."""

    def __init__(self, name: str, argv: Sequence[str], log_dir: Path,
                 env: Mapping[str, str] | None = None, cwd: Path | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_dir / f"{name}.log"
        self.env = dict(os.environ if env is None else env)
        self.cwd = cwd
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Daemon:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd,
            start_new_session=True)
        log.close()
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Kill the whole process group (``kill -9`` of a worker and its children)."""
        if self.process is not None and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                pass
            self.process.wait(30)

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        # leftovers of the group (build processes) must not outlive the test
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return self.process.returncode

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def circus_command(name: str) -> str:
    return str(VENV_BIN / name)


def wait_until(predicate: object, timeout: float = 30.0, interval: float = 0.1,
               message: str = "condition") -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"{message} not reached within {timeout}s")


def cache_server(tmp_path: Path, *, database_url: str, redis_url: str, cache_dir: Path | str,
                 workers: int, cache_options: str = "") -> tuple[Daemon, int]:
    """A ``circus-server`` (gunicorn) serving the binary cache in ``cache_dir``, not yet
    started (use it as a context manager), and its port; ``cache_options``: more lines
    of its ``[cache]`` section."""
    from tests.helpers.net import free_port

    config = tmp_path / "circus.toml"
    config.write_text(f"""
[database]
url = "{database_url}"
[broker]
url = "{redis_url}"
[server]
secret_key = "{'s' * 40}"
workers = {workers}
[cache]
cache_dir = "{cache_dir}"
{cache_options}
""")
    port = free_port()
    env = {**os.environ, "CIRCUS_CONFIG_FILE": str(config)}
    return Daemon("circus-server", [circus_command("circus-server"), "--port", str(port)],
                  tmp_path, env=env), port
