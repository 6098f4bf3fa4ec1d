"""What a runner knows about one SSH builder, shared by the pool and its steps.

The pool (``pool.py``) reads the rows, chooses builders and starts steps; a
step (``step.py``) learns things about its builder while it works (which store
paths it has, its cores, whether it failed). That knowledge lives here, so a
step needs its :class:`Builder` only, never the pool: the pool calls into
steps, not the other way round.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, replace

from sqlalchemy.orm import Session, sessionmaker

from circus.common.config import Settings
from circus.common.db import in_transaction
from circus.queue_runner.routing.capabilities import Capabilities
from circus.queue_runner.ssh import health
from circus.queue_runner.ssh.connection import Remote, RemoteError

log = logging.getLogger(__name__)

#: store paths remembered per builder (about 10 MB of memory at most)
MAX_KNOWN_PATHS = 100_000


@dataclass(frozen=True)
class BuilderRow:
    id: int
    name: str
    ssh_uri: str
    systems: tuple[str, ...]
    max_jobs: int
    speed_factor: float
    supported_features: tuple[str, ...]
    mandatory_features: tuple[str, ...]
    ssh_key_file: str | None
    public_host_key: str | None
    consecutive_failures: int
    #: seconds of back-off left when the row was read
    rest_secs: float

    @property
    def connection_config(self) -> tuple[str, str | None, str | None]:
        return self.ssh_uri, self.ssh_key_file, self.public_host_key


def rest_until(rest_secs: float) -> float:
    """Monotonic end of a back-off (0: not resting)."""
    return time.monotonic() + rest_secs if rest_secs > 0 else 0.0


class Builder:
    """One builder's row, back-off and learnt facts (thread-safe under ``lock``)."""

    def __init__(self, row: BuilderRow, settings: Settings, factory: sessionmaker[Session],
                 lock: threading.RLock | None = None) -> None:
        self.row = row
        self.settings = settings
        self.factory = factory
        #: the pool's lock: it reads these fields together with its own
        self.lock = lock or threading.RLock()
        self.cpu_count: int | None = None
        self.rest_until = rest_until(row.rest_secs)
        #: store paths the builder is known to have (sent, checked or built there);
        #: forgotten after any failure of the builder (it may have lost its store)
        self.known: set[str] = set()

    @property
    def id(self) -> int:
        return self.row.id

    @property
    def name(self) -> str:
        return self.row.name

    @property
    def capabilities(self) -> Capabilities:
        row = self.row
        return Capabilities(frozenset(row.systems), frozenset(row.supported_features),
                            frozenset(row.mandatory_features))

    @property
    def failing(self) -> bool:
        return self.row.consecutive_failures > 0 or self.resting()

    def resting(self, now: float | None = None) -> bool:
        return (now if now is not None else time.monotonic()) < self.rest_until

    # ------------------------------------------------------------ health

    def record_failure(self, message: str) -> None:
        """Record an infrastructure failure of the builder: back-off grows."""
        try:
            state = in_transaction(self.factory, lambda s: health.record_failure(
                s, self.settings, self.id, message))
        except Exception:
            log.exception("could not record a failure of SSH builder %s", self.name)
            state = None
        with self.lock:
            self.known.clear()
            if state is not None:
                self.rest_until = rest_until(state.rest_secs)
                self.row = replace(self.row, consecutive_failures=state.consecutive_failures)
        log.warning("SSH builder %s failed (%s failure(s) in a row, resting %.0f s): %s",
                    self.name, state.consecutive_failures if state else "?",
                    state.rest_secs if state else 0.0, message)

    def record_ok(self) -> None:
        """Nix there gave a verdict: the builder works (the row is reset in the
        step's finishing transaction, ``health.record_success``)."""
        with self.lock:
            if self.row.consecutive_failures or self.resting():
                self.row = replace(self.row, consecutive_failures=0)
                self.rest_until = 0.0

    # ------------------------------------------------------------ its store

    def unknown_paths(self, paths: list[str]) -> list[str]:
        with self.lock:
            return [p for p in paths if p not in self.known]

    def learn_valid(self, paths: list[str]) -> None:
        with self.lock:
            if len(self.known) + len(paths) > MAX_KNOWN_PATHS:
                self.known.clear()
            self.known.update(paths)

    def learn_cpu_count(self, remote: Remote) -> None:
        """Cores of the builder (``cpu_core_count_with_speed_factor``), asked once."""
        if self.cpu_count is not None:
            return
        try:
            result = remote.run("nproc 2>/dev/null || getconf _NPROCESSORS_ONLN", timeout=30)
            self.cpu_count = max(1, int(result.stdout.decode().split()[0]))
        except (RemoteError, ValueError, IndexError):
            self.cpu_count = self.row.max_jobs
