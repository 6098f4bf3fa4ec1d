"""The SSH worker: the queue runner's consumer of the class queues for ``remote_builders``.

One thread keeps the enabled builders' rows fresh and, for every class with
queued steps (found by a sweep every second, or kicked by a wake-up token or
a step that just finished), lets ``queue_runner.scheduling_strategy`` pick a
builder with a free slot that may take the class (``strategy.choose``: the
capability rule, ``max_jobs``, no back-off), claims one step for it through a
``steps.holder.StepHolder`` (worker ``ssh:<builder>:<slot>@<runner instance>``)
and builds it in a thread of its own (``step.SshStep``). Calls go one way: the
pool starts steps and hears of them through the holder's ``on_finished`` and
the step's ``on_done``; a step knows its ``builder.Builder``, never the pool.

``max_jobs`` holds across runner processes: a claim takes a transaction-level
advisory lock per builder and counts the builder's running steps first.
Builders whose row cannot work (bad ``ssh_uri``, unreadable key file,
missing or malformed ``public_host_key`` while ``ssh_require_host_key`` is
on) are not used; the reason is recorded in ``last_failure`` like any
failure, with the same back-off.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from paramiko import PKey
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from circus.common.config import Settings
from circus.common.db import in_transaction
from circus.queue_runner.derivations import DrvCache
from circus.queue_runner.routing.strategy import Candidate, choose
from circus.queue_runner.routing.wakeups import Publish, WakeupConsumer
from circus.queue_runner.ssh.builder import Builder, BuilderRow, rest_until
from circus.queue_runner.ssh.connection import (
    Remote,
    remote_nix_config,
    remote_prelude,
)
from circus.queue_runner.ssh.hosts import (
    HostKeyFormatError,
    SshTarget,
    parse_host_keys,
    parse_ssh_uri,
)
from circus.queue_runner.ssh.step import SshStep
from circus.queue_runner.steps.holder import StepHolder
from circus.queue_runner.steps.leases import ClaimedStep, ClaimOptions
from circus.queue_runner.steps.outcomes import FinishReport

log = logging.getLogger(__name__)

SWEEP_SECS = 1.0
REFRESH_SECS = 1.0
#: pg_advisory_xact_lock key space of per-builder claims ("CSSH")
CLAIM_LOCK = 0x43535348
#: how long shutdown waits for running steps to stop and hand their steps back
SHUTDOWN_WAIT = 20.0


class BuilderHandle(Builder):
    """A builder as the pool uses it: its connection, problem and running steps."""

    def __init__(self, row: BuilderRow, settings: Settings, factory: sessionmaker[Session],
                 lock: threading.RLock) -> None:
        super().__init__(row, settings, factory, lock)
        self.remote: Remote | None = None
        self.problem: str | None = None
        self.steps: dict[int, SshStep] = {}
        #: running steps of this builder held by other runner processes
        self.others = 0
        #: disabled or deleted while steps still ran on it: takes no new ones
        self.retired = False

    def usable(self, now: float) -> bool:
        return (self.remote is not None and self.problem is None and not self.retired
                and not self.resting(now))

    def free_slot(self) -> int | None:
        for slot in range(self.row.max_jobs):
            if slot not in self.steps:
                return slot
        return None


def worker_prefix(builder_name: str) -> str:
    return f"ssh:{builder_name}:"


class SshBuilders(threading.Thread):
    def __init__(self, settings: Settings, factory: sessionmaker[Session], *,
                 publish: Publish | None = None,
                 on_built: Callable[[FinishReport], None] | None = None,
                 stop: threading.Event | None = None, cache: DrvCache | None = None,
                 instance: str | None = None, wakeups: bool = True) -> None:
        super().__init__(name="ssh-builders", daemon=True)
        self.settings = settings
        self.runner = settings.queue_runner
        self.factory = factory
        self.publish = publish
        self.on_built = on_built
        self.stop = stop or threading.Event()
        self.cache = cache or DrvCache()
        self.instance = instance or f"{socket.gethostname()}:{os.getpid()}"
        self.nix_env = settings.nix_environ()
        nix = settings.nix
        self.prelude = remote_prelude(
            self.runner.ssh_remote_path,
            remote_nix_config(nix.substituters, nix.trusted_public_keys,
                              {**nix.sandbox_options(), **self.runner.ssh_nix_config}))
        self.handles: dict[int, BuilderHandle] = {}
        self.known_classes: list[str] = []
        self._lock = threading.RLock()
        self._kicked: set[str] = set()
        self._wakeup = threading.Event()
        self._next_refresh = 0.0
        self._retired: list[Remote] = []
        self.started_steps = 0
        self.consumer: WakeupConsumer | None = None
        if wakeups and settings.broker.url:
            self.consumer = WakeupConsumer(self, settings.broker.url, name="ssh-wakeups")

    # ------------------------------------------------------------ thread

    def run(self) -> None:
        if self.consumer is not None:
            self.consumer.start()
        while not self.stop.is_set():
            try:
                self.round()
            except Exception:
                log.exception("SSH builder round failed")
            self._wakeup.wait(SWEEP_SECS)
            self._wakeup.clear()
        self._shutdown()

    def _shutdown(self) -> None:
        if self.consumer is not None:
            self.consumer.stop()
        deadline = time.monotonic() + SHUTDOWN_WAIT
        for step in self.running_steps():
            step.join(max(0.1, deadline - time.monotonic()))
        with self._lock:
            remotes = [h.remote for h in self.handles.values() if h.remote] + self._retired
        for remote in remotes:
            remote.close()

    def running_steps(self) -> list[SshStep]:
        with self._lock:
            return [s for h in self.handles.values() for s in h.steps.values()]

    def round(self) -> None:
        now = time.monotonic()
        if now >= self._next_refresh:
            self._next_refresh = now + REFRESH_SECS
            in_transaction(self.factory, self.refresh)
            self._report_problems()
            now = time.monotonic()
        with self._lock:
            kicked, self._kicked = self._kicked, set()
            if not any(h.usable(now) and h.free_slot() is not None
                       for h in self.handles.values()):
                return
        queued = self._queued_classes()
        for queue_class in sorted(set(self.servable_classes(sorted(queued | kicked)))):
            if self.stop.is_set():
                return
            self.fill(queue_class)

    # ------------------------------------------------------------ wake-ups

    def kick_threadsafe(self, queue_class: str) -> None:
        with self._lock:
            self._kicked.add(queue_class)
        self._wakeup.set()

    def _claim_dependents(self, report: FinishReport) -> None:
        """A step finished: claim its newly queued dependents without a broker round trip."""
        for queue_class in report.queued:
            self.kick_threadsafe(queue_class)

    def servable_classes(self, known: list[str]) -> list[str]:
        """Classes some usable builder with a free slot could take now."""
        now = time.monotonic()
        with self._lock:
            caps = [h.capabilities for h in self.handles.values()
                    if h.usable(now) and len(h.steps) + h.others < h.row.max_jobs]
        return [c for c in known if any(cap.can_serve(c) for cap in caps)]

    def _queued_classes(self) -> set[str]:
        with self.factory() as session:
            return set(session.execute(text(
                "SELECT DISTINCT queue_class FROM steps WHERE state = 'queued'")).scalars())

    # ------------------------------------------------------------ builders

    def refresh(self, session: Session) -> None:
        rows = session.execute(text("""
            SELECT id, name, ssh_uri, systems, max_jobs, speed_factor, supported_features,
                   mandatory_features, ssh_key_file, public_host_key, consecutive_failures,
                   GREATEST(0, EXTRACT(EPOCH FROM disabled_until - now()))::float8 AS rest_secs
            FROM remote_builders WHERE enabled ORDER BY id
        """)).all()
        running: dict[str, int] = dict(session.execute(text("""
            SELECT machine, count(*) FROM steps
            WHERE state = 'running' AND worker LIKE 'ssh:%' GROUP BY machine
        """)).all())
        self.known_classes = list(session.execute(text(
            "SELECT name FROM queue_classes")).scalars())
        seen: set[int] = set()
        with self._lock:
            for raw in rows:
                row = BuilderRow(raw.id, raw.name, raw.ssh_uri, tuple(raw.systems or ()),
                                 int(raw.max_jobs), float(raw.speed_factor),
                                 tuple(raw.supported_features or ()),
                                 tuple(raw.mandatory_features or ()), raw.ssh_key_file,
                                 raw.public_host_key, int(raw.consecutive_failures),
                                 float(raw.rest_secs or 0.0))
                seen.add(row.id)
                handle = self.handles.get(row.id)
                if handle is None:
                    handle = self.handles[row.id] = BuilderHandle(row, self.settings,
                                                                  self.factory, self._lock)
                    self._configure(handle)
                else:
                    handle.retired = False
                    changed = handle.row.connection_config != row.connection_config
                    handle.row = row
                    handle.rest_until = rest_until(row.rest_secs)
                    if changed:
                        self._configure(handle)
                ours = sum(1 for s in handle.steps.values() if s.is_alive())
                handle.others = max(0, int(running.get(row.name, 0)) - ours)
            for gone in set(self.handles) - seen:
                handle = self.handles[gone]
                handle.retired = True
                if not handle.steps:
                    # disabled or deleted: running steps finish, then the connection goes
                    if handle.remote is not None:
                        self._retired.append(handle.remote)
                    del self.handles[gone]
            idle = [r for r in self._retired if not self._in_use(r)]
            self._retired = [r for r in self._retired if self._in_use(r)]
        for remote in idle:
            remote.close()

    def _in_use(self, remote: Remote) -> bool:
        return any(s.remote is remote for h in self.handles.values() for s in h.steps.values())

    def _configure(self, handle: BuilderHandle) -> None:
        """(Re)build the connection of a builder whose address or keys changed."""
        if handle.remote is not None:
            self._retired.append(handle.remote)
        handle.remote, handle.problem, handle.cpu_count = None, None, None
        row = handle.row
        try:
            target = parse_ssh_uri(row.ssh_uri)
            keys = self._host_keys(row)
        except (ValueError, HostKeyFormatError) as exc:
            handle.problem = f"refused: {exc}"
            return
        if row.ssh_key_file and not os.access(row.ssh_key_file, os.R_OK):
            handle.problem = f"refused: ssh_key_file {row.ssh_key_file} is not readable"
            return
        handle.remote = self._make_remote(row, target, keys)

    def _make_remote(self, row: BuilderRow, target: SshTarget, keys: list[PKey] | None
                     ) -> Remote:
        return Remote(row.name, target, key_file=row.ssh_key_file, host_keys=keys,
                      connect_timeout=float(self.runner.ssh_connect_timeout),
                      prelude=self.prelude)

    def _host_keys(self, row: BuilderRow) -> list[PKey] | None:
        if row.public_host_key and row.public_host_key.strip():
            try:
                return parse_host_keys(row.public_host_key)
            except HostKeyFormatError as exc:
                raise HostKeyFormatError(f"public_host_key: {exc}") from None
        if self.runner.ssh_require_host_key:
            raise HostKeyFormatError(
                "no public_host_key, and queue_runner.ssh_require_host_key is on "
                "(give the builder's key, e.g. from `ssh-keyscan <host>`)")
        log.warning("SSH builder %s has no public_host_key: its host key is not checked",
                    row.name)
        return None

    def _report_problems(self) -> None:
        now = time.monotonic()
        with self._lock:
            broken = [h for h in self.handles.values() if h.problem and not h.resting(now)]
        for handle in broken:
            assert handle.problem is not None
            handle.record_failure(handle.problem)

    # ------------------------------------------------------------ scheduling

    def candidates(self) -> list[Candidate]:
        now = time.monotonic()
        with self._lock:
            return [Candidate(
                key=str(h.id), capabilities=h.capabilities, speed_factor=h.row.speed_factor,
                cpu_count=h.cpu_count or h.row.max_jobs, max_jobs=h.row.max_jobs,
                current_jobs=len(h.steps) + h.others, pressure=None, heartbeat_age=None,
                disabled=not h.usable(now)) for h in self.handles.values()]

    def fill(self, queue_class: str) -> int:
        """Start steps of ``queue_class`` while some builder can take one; returns how many."""
        started = 0
        while not self.stop.is_set():
            chosen = choose(self.candidates(), queue_class,
                            strategy=self.runner.scheduling_strategy,
                            psi_threshold=self.runner.psi_threshold, heartbeat_ttl=0.0)
            if chosen is None:
                break
            with self._lock:
                handle = self.handles.get(int(chosen.key))
                slot = handle.free_slot() if handle is not None else None
            if handle is None or slot is None or handle.remote is None:
                break
            holder = StepHolder(self.settings, self.factory,
                                f"{worker_prefix(handle.name)}{slot}@{self.instance}",
                                publish=self.publish, on_built=self.on_built,
                                on_finished=self._claim_dependents)
            claimed = in_transaction(self.factory, partial(
                self._claim, handle=handle, holder=holder, queue_class=queue_class))
            if claimed is None:
                continue  # full through other runners' steps; ``others`` was updated
            if not claimed:
                break
            step = SshStep(holder, handle, slot, claimed[0], handle.remote, cache=self.cache,
                           nix_env=self.nix_env, shutdown=self.stop,
                           on_done=partial(self.step_done, handle))
            with self._lock:
                handle.steps[slot] = step
            self.started_steps += 1
            step.start()
            started += 1
        return started

    def _claim(self, session: Session, handle: BuilderHandle, holder: StepHolder,
               queue_class: str) -> list[ClaimedStep] | None:
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"),
                        {"key": (CLAIM_LOCK << 32) | handle.id})
        prefix = worker_prefix(handle.name)
        running = session.execute(text("""
            SELECT count(*) FROM steps
            WHERE state = 'running' AND left(worker, :n) = :prefix
        """), {"n": len(prefix), "prefix": prefix}).scalar_one()
        if running >= handle.row.max_jobs:
            with self._lock:
                handle.others = max(handle.others, int(running) - len(handle.steps))
            return None
        return holder.claim(session, queue_class, ClaimOptions(
            limit=1, machine=handle.name, lookahead=False,
            critical_path=self.runner.critical_path_first))

    def step_done(self, handle: BuilderHandle, step: SshStep) -> None:
        """``step``'s thread ends: its slot on ``handle`` is free."""
        with self._lock:
            if handle.steps.get(step.slot) is step:
                del handle.steps[step.slot]
        self.kick_threadsafe(step.claimed.queue_class)

    # ------------------------------------------------------------ visibility

    def details(self) -> dict[str, Any]:
        now = time.monotonic()
        with self._lock:
            return {
                "builders": {h.name: {"running": len(h.steps), "usable": h.usable(now),
                                      "problem": h.problem}
                             for h in self.handles.values()},
                "started_steps": self.started_steps,
            }

