"""One ``nix-store --realise`` over a batch of derivations, reported per derivation.

Starting a Nix process costs more than building a trivial derivation, so a
worker realises all the steps it claimed in one invocation (``--keep-going
-j1``) and this module splits what Nix says back into per-derivation events:

- ``--log-format internal-json`` tags every build log line with the id of the
  build activity, whose ``start`` event names the derivation: lines go to that
  step's log file;
- the ``builds`` progress counter (done/failed) moves when a build ends; with
  one build at a time (``-j1``) the build that was running is the one that
  ended, so a success is reported at once instead of when the batch exits;
- error messages name the derivation and say why (exit code, signal, timeout,
  log limit, failed dependencies).

Whatever is not attributed while Nix runs is settled by the caller once it
exits (output validity decides). Builders run in their own sessions (Nix calls
``setsid``), so killing means walking the process tree (``procs``).
"""

from __future__ import annotations

import json
import logging
import queue
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from circus.common.nix.failures import Kind, classify
from circus.common.nix.process import dying_with_parent
from circus.queue_runner import procs
from circus.queue_runner.logs import StepLog

log = logging.getLogger(__name__)

# activity and result types of Nix's logger (libutil/logging.hh)
ACT_BUILDS = 104
ACT_BUILD = 105
RES_BUILD_LOG_LINE = 101
RES_PROGRESS = 105
LVL_ERROR = 0

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_DRV = re.compile(r"/nix/store/[0-9a-z]{32}-[^'\s\"!]+\.drv")
_STORE_PATH = re.compile(r"/nix/store/[0-9a-z]{32}-[^'\s\"!/]+")


@dataclass(frozen=True)
class Target:
    step_id: int
    drv_path: str
    outputs: Mapping[str, str]
    log_path: Path
    #: derivations it depends on (to name only the batch's roots to Nix)
    inputs: frozenset[str] = frozenset()


def roots(targets: list[Target]) -> list[str]:
    """Targets no other target depends on: Nix builds the rest as their dependencies.

    Fewer top-level goals cost Nix less, and Nix reports the failure of a
    dependency (a goal with waiters) at once instead of when it exits.
    """
    needed = set().union(*(t.inputs for t in targets)) if targets else set()
    return sorted(t.drv_path for t in targets if t.drv_path not in needed)


@dataclass
class RunOptions:
    env: Mapping[str, str]
    timeout: int
    max_silent: int
    max_log_size: int
    extra_args: list[str] = field(default_factory=list)
    system_features: list[str] | None = None
    extra_platforms: list[str] = field(default_factory=list)
    #: cgroup directory the nix-store process (and so its builders) is moved into
    build_cgroup: str | None = None


@dataclass(frozen=True)
class Started:
    drv_path: str
    at: float


@dataclass(frozen=True)
class Finished:
    drv_path: str
    kind: Kind
    at: float
    exit_code: int | None = None
    signal: int | None = None
    message: str | None = None
    #: OOM kills counted while this derivation was building (None: unknown)
    oom_kills: int | None = None


@dataclass(frozen=True)
class Exited:
    returncode: int
    #: error messages that named none of the batch's derivations
    errors: list[str]
    at: float


Event = Started | Finished | Exited


def nix_argv(drvs: list[str], options: RunOptions) -> list[str]:
    """The ``nix-store --realise`` command itself (also what runs on SSH builders)."""
    argv = ["nix-store", "--realise", *drvs, "--keep-going", "--max-jobs", "1",
            "--log-format", "internal-json",
            "--timeout", str(options.timeout),
            "--max-silent-time", str(options.max_silent),
            "--option", "max-build-log-size", str(options.max_log_size)]
    if options.system_features is not None:
        argv += ["--option", "system-features", " ".join(options.system_features)]
    if options.extra_platforms:
        argv += ["--option", "extra-platforms", " ".join(options.extra_platforms)]
    argv += options.extra_args
    return argv


def build_argv(drvs: list[str], options: RunOptions) -> list[str]:
    """:func:`nix_argv` as the local workers run it (build cgroup, death signal)."""
    argv = nix_argv(drvs, options)
    if options.build_cgroup:
        # move the shell into the build cgroup before it becomes nix-store, so every
        # builder is born there (OOM accounting, limits)
        procs_file = str(Path(options.build_cgroup) / "cgroup.procs")
        argv = ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', procs_file, *argv]
    # nix-store dies with the worker thread that started it (kill -9 of the worker)
    return dying_with_parent(argv, "KILL")


class NixProcess(Protocol):
    """What :class:`NixRun` needs of the process it reads (local, or a channel on an
    SSH builder)."""

    @property
    def pid(self) -> int: ...

    @property
    def stderr(self) -> Iterable[bytes] | None: ...

    def poll(self) -> int | None: ...

    def wait(self) -> int: ...


class NixRun:
    """A running ``nix-store --realise``; events arrive on :attr:`events`."""

    def __init__(self, targets: list[Target], options: RunOptions,
                 oom_counter: Callable[[], int | None] | None = None) -> None:
        self.targets = {t.drv_path: t for t in targets}
        self.options = options
        # builds run one at a time (-j1): OOM kills between a build's start and end are its
        self._oom_counter = oom_counter
        self._oom_start: dict[str, int | None] = {}
        self._oom_end: dict[str, int | None] = {}
        self.events: queue.Queue[Event] = queue.Queue()
        # the builder's own output is capped by Nix (max-build-log-size); this is the
        # backstop in case it does not: kill that builder ourselves
        backstop = options.max_log_size + options.max_log_size // 10 + 65536
        self.logs = {t.drv_path: StepLog(t.log_path, backstop) for t in targets}
        self._by_output: dict[str, str] = {
            path: t.drv_path for t in targets for path in t.outputs.values()}
        self._activity: dict[int, str] = {}
        self._builds_activity: int | None = None
        self._running: list[str] = []
        self._awaiting_reason: set[str] = set()
        self._done = 0
        self._failed = 0
        self._reported: set[str] = set()
        self._errors: list[str] = []
        self._lock = threading.Lock()
        self.process: NixProcess | None = None
        self._reader: threading.Thread | None = None
        self.killed = False
        #: successes reported while Nix ran (the rest is settled after it exits)
        self.attributed = 0

    # ----------------------------------------------------------------- control

    def start(self) -> NixRun:
        self.process = self._spawn(roots(list(self.targets.values())))
        self._reader = threading.Thread(target=self._read, name="nix-reader", daemon=True)
        self._reader.start()
        return self

    def _spawn(self, drvs: list[str]) -> NixProcess:
        return subprocess.Popen(
            build_argv(drvs, self.options), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=dict(self.options.env),
            start_new_session=True)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def kill(self) -> None:
        """Kill nix-store and every builder it started."""
        self.killed = True
        if self.process is not None and self.process.poll() is None:
            procs.kill_tree(self.process.pid)

    def kill_derivation(self, drv_path: str) -> int:
        """Kill only the builder of one derivation (the rest of the batch goes on)."""
        target = self.targets.get(drv_path)
        if target is None or self.process is None:
            return 0
        return procs.kill_builders_of(target.outputs, within=self.process.pid)

    def wait(self, timeout: float | None = None) -> None:
        if self._reader is not None:
            self._reader.join(timeout)

    # ----------------------------------------------------------------- parsing

    def _emit(self, event: Event) -> None:
        self.events.put(event)

    def _oom_count(self) -> int | None:
        return self._oom_counter() if self._oom_counter is not None else None

    def _report(self, drv: str, kind: Kind, exit_code: int | None = None,
                signal: int | None = None, message: str | None = None) -> None:
        with self._lock:
            if drv in self._reported:
                return
            self._reported.add(drv)
        start = self._oom_start.get(drv)
        end = self._oom_end[drv] if drv in self._oom_end else self._oom_count()
        kills = end - start if start is not None and end is not None else None
        self._emit(Finished(drv, kind, time.time(), exit_code, signal, message, kills))

    def _read(self) -> None:
        assert self.process is not None
        assert self.process.stderr is not None
        try:
            for raw in self.process.stderr:
                if raw.startswith(b"@nix "):
                    try:
                        event = json.loads(raw[5:])
                    except ValueError:
                        self._other(raw)
                        continue
                    try:
                        self._handle(event)
                    except Exception:  # a surprising event must not lose the batch
                        log.exception("could not handle Nix event %r", raw[:300])
                else:
                    self._other(raw)
        finally:
            returncode = self.process.wait()
            self._emit(Exited(returncode, list(self._errors), time.time()))

    def _other(self, raw: bytes) -> None:
        text = _ANSI.sub("", raw.decode(errors="replace")).rstrip()
        if text:
            self._errors.append(text)

    def _handle(self, event: dict[str, object]) -> None:
        action = event.get("action")
        kind = event.get("type")
        ident = event.get("id")
        if action == "result":
            fields = event.get("fields")
            if kind == RES_BUILD_LOG_LINE and isinstance(fields, list) and fields:
                drv = self._activity.get(ident) if isinstance(ident, int) else None
                if drv is not None and drv in self.logs:
                    self._log_line(drv, str(fields[0]))
            elif kind == RES_PROGRESS and ident == self._builds_activity \
                    and isinstance(fields, list) and len(fields) >= 4:
                self._progress(int(fields[0]), int(fields[3]))
        elif action == "start":
            if kind == ACT_BUILD:
                fields = event.get("fields")
                if isinstance(fields, list) and fields and isinstance(ident, int):
                    drv = str(fields[0])
                    self._activity[ident] = drv
                    self._running.append(drv)
                    if drv in self.targets:
                        self._oom_start[drv] = self._oom_count()
                        self.logs[drv].touch()
                        self._emit(Started(drv, time.time()))
            elif kind == ACT_BUILDS and isinstance(ident, int):
                self._builds_activity = ident
        elif action == "msg" and event.get("level") == LVL_ERROR:
            self._error(_ANSI.sub("", str(event.get("msg", ""))))

    def _log_line(self, drv: str, line: str) -> None:
        step_log = self.logs[drv]
        step_log.write(line.encode(errors="replace") + b"\n")
        if step_log.over_limit and drv not in self._reported:
            # Nix did not enforce max-build-log-size: kill that builder ourselves
            self._report(drv, Kind.log_limit, message="log size limit exceeded")
            self.kill_derivation(drv)

    def _progress(self, done: int, failed: int) -> None:
        new_done, new_failed = done - self._done, failed - self._failed
        self._done, self._failed = done, failed
        ended = new_done + new_failed
        if ended <= 0:
            return
        if ended != len(self._running):
            # more builds in flight than ended: cannot tell which; settled at exit
            self._running = [d for d in self._running if d not in self._reported]
            return
        ended_drvs, self._running = self._running, []
        for drv in ended_drvs:
            if drv not in self.targets:
                continue
            self._oom_end[drv] = self._oom_count()
            if new_failed == 0:
                self._report(drv, Kind.built)
                self.attributed += 1
            else:
                # the reason follows in an error message naming the derivation
                self._awaiting_reason.add(drv)

    def _target_of(self, message: str) -> str | None:
        drv: str
        for drv in _DRV.findall(message):
            if drv in self.targets:
                return drv
        path: str
        for path in _STORE_PATH.findall(message):
            if path in self._by_output:
                return self._by_output[path]
        return None

    def _error(self, message: str) -> None:
        text = message.removeprefix("error: ").strip()
        if text.startswith("build of ") and text.endswith("failed"):
            return  # the summary at the end names every failed derivation
        drv = self._target_of(text)
        if drv is None:
            self._errors.append(text)
            return
        self.logs[drv].note(f"error: {text}")
        kind, exit_code, signal = classify(text)
        self._awaiting_reason.discard(drv)
        if drv in self._running:
            self._running.remove(drv)
        self._report(drv, kind, exit_code, signal, text)
