"""Supervision of ``circus up``'s daemons: restart with back-off, give up on a crash loop.

A daemon that exits while the instance is meant to run is started again after
1, 2, 4, … (at most ``MAX_DELAY``) seconds; a daemon that crashed ``GIVE_UP_AFTER``
times within ``CRASH_WINDOW`` seconds stops the instance with its last log lines.
Restart counts are written to a small JSON file that ``/health`` shows.
Children get SIGTERM when ``circus up`` dies (``die_with_parent``), so kill -9 of
the supervisor leaves no orphans holding the port.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from circus.common.localservices import die_with_parent

MAX_DELAY = 30.0
CRASH_WINDOW = 120.0
GIVE_UP_AFTER = 5
LAST_LINES = 20


@dataclass
class Supervised:
    name: str
    argv: list[str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    crashes: deque[float] = field(default_factory=deque)
    restart_at: float | None = None
    last_exit: int | None = None

    def last_log_lines(self, count: int = LAST_LINES) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-count:])


class CrashLoop(RuntimeError):
    """A daemon keeps crashing: the instance stops instead of restarting it forever."""


class Supervisor:
    def __init__(self, env: dict[str, str], status_file: Path,
                 say: Callable[[str], None]) -> None:
        self.env = env
        self.status_file = status_file
        self.say = say
        self.daemons: list[Supervised] = []

    def add(self, name: str, argv: list[str], log_path: Path) -> None:
        self.daemons.append(Supervised(name, argv, log_path))

    def _spawn(self, daemon: Supervised) -> None:
        with daemon.log_path.open("ab") as log:
            daemon.process = subprocess.Popen(
                daemon.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=die_with_parent())
        daemon.restart_at = None

    def start_all(self) -> None:
        for daemon in self.daemons:
            self._spawn(daemon)
        self.write_status()

    def poll(self, now: float | None = None) -> None:
        """Notice exits and restart what is due; raises ``CrashLoop`` to give up."""
        now = time.monotonic() if now is None else now
        changed = False
        for daemon in self.daemons:
            process = daemon.process
            if process is not None and process.poll() is not None:
                daemon.process = None
                daemon.last_exit = process.returncode
                daemon.crashes.append(now)
                while daemon.crashes and now - daemon.crashes[0] > CRASH_WINDOW:
                    daemon.crashes.popleft()
                if len(daemon.crashes) >= GIVE_UP_AFTER:
                    raise CrashLoop(
                        f"{daemon.name} exited {len(daemon.crashes)} times within "
                        f"{CRASH_WINDOW:.0f} s (last exit {process.returncode}); stopping. "
                        f"Its last log lines ({daemon.log_path}):\n{daemon.last_log_lines()}")
                delay = min(MAX_DELAY, 2.0 ** (len(daemon.crashes) - 1))
                daemon.restart_at = now + delay
                self.say(f"{daemon.name} exited with {process.returncode}; restarting in "
                         f"{delay:.0f} s (logs in {daemon.log_path})")
                changed = True
            if daemon.process is None and daemon.restart_at is not None \
                    and now >= daemon.restart_at:
                self._spawn(daemon)
                daemon.restarts += 1
                self.say(f"{daemon.name} restarted (restart {daemon.restarts}, "
                         f"pid {daemon.process.pid if daemon.process else '?'})")
                changed = True
        if changed:
            self.write_status()

    def write_status(self) -> None:
        status = {
            "pid": os.getpid(),
            "daemons": {
                d.name: {"pid": d.process.pid if d.process else None,
                         "running": d.process is not None, "restarts": d.restarts,
                         "last_exit": d.last_exit}
                for d in self.daemons},
        }
        partial = self.status_file.with_suffix(".tmp")
        partial.write_text(json.dumps(status))
        partial.replace(self.status_file)

    def stop_all(self, timeout: float = 30.0) -> None:
        running = [d.process for d in self.daemons if d.process is not None]
        for process in running:
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + timeout
        for process in running:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        for daemon in self.daemons:
            daemon.process = None
        self.status_file.unlink(missing_ok=True)

