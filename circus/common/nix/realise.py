"""Realise one derivation with ``nix-store --realise`` and classify what happened.

The agent's builder. Local workers and SSH builders realise batches instead
(``queue_runner.local.nixrun``); all three classify failures with
:mod:`circus.common.nix.failures`. Timeouts are Nix's own (``--timeout``,
``--max-silent-time``), the log cap is ours (the process group is killed when
the log grows past it), and the outcome follows SPEC §2. No database imports:
the agent uses this module.
"""

from __future__ import annotations

import asyncio
import enum
import os
import signal
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from circus.common.enums import BuildStatus
from circus.common.nix import failures
from circus.common.nix.oom import host_oom_kills
from circus.common.nix.process import killed_with_parent

LOG_CHUNK = 64 * 1024


class Outcome(enum.Enum):
    success = "success"
    failed = "failed"
    failed_with_output = "failed_with_output"
    timed_out = "timed_out"
    log_limit_exceeded = "log_limit_exceeded"
    oom_killed = "oom_killed"
    #: Nix itself could not run (infrastructure): retried
    aborted = "aborted"
    #: stopped on request (cancel/abort)
    cancelled = "cancelled"


@dataclass
class RealiseResult:
    outcome: Outcome
    returncode: int | None
    started_at: float
    finished_at: float
    log_bytes: int
    #: last lines of the output, for error messages
    tail: str = ""
    error_message: str | None = None
    outputs: dict[str, str] = field(default_factory=dict)


def build_argv(drv_paths: Sequence[str], *, timeout: int | None, max_silent: int | None,
               extra_args: Sequence[str] = (), cores: int = 0, keep_going: bool = False,
               ) -> list[str]:
    argv = ["nix-store", "--realise", *drv_paths]
    if timeout:
        argv += ["--timeout", str(timeout)]
    if max_silent:
        argv += ["--max-silent-time", str(max_silent)]
    if cores:
        argv += ["--cores", str(cores)]
    if keep_going:
        argv.append("--keep-going")
    argv += list(extra_args)
    return argv


#: how long a cancelled ``nix-store`` may take to stop its builders before SIGKILL
CANCEL_GRACE_SECS = 5.0


def classify(returncode: int | None, tail: str, *, log_limit_hit: bool, cancelled: bool,
             oom_before: int | None, oom_after: int | None,
             failed_marker: bool) -> tuple[Outcome, str | None]:
    """Map a finished ``nix-store --realise`` to an outcome and an error message."""
    if cancelled:
        return Outcome.cancelled, "cancelled"
    if log_limit_hit:
        return Outcome.log_limit_exceeded, "log limit exceeded"
    if returncode == 0:
        if failed_marker:
            return Outcome.failed_with_output, "the build marked itself failed (nix-support/failed)"
        return Outcome.success, None
    last_error = next((line for line in reversed(tail.splitlines())
                       if line.startswith("error:")), None)
    message = last_error.removeprefix("error:").strip() if last_error else None
    # the whole tail: the last error is often only "build of … failed"
    kind, _, signal_number = failures.classify(tail)
    oom_kills = oom_after - oom_before if oom_before is not None and oom_after is not None \
        else None
    status, _ = failures.failure_status(kind, signal_number, oom_kills)
    if status is BuildStatus.timeout:
        return Outcome.timed_out, message or "timed out"
    if status is BuildStatus.oom_killed:
        return Outcome.oom_killed, message or "killed by the OOM killer"
    if status is BuildStatus.log_limit_exceeded:
        return Outcome.log_limit_exceeded, message or "log limit exceeded"
    if returncode in (100, 101, 102, 104) or (message and "builder for" in message):
        return Outcome.failed, message or f"nix-store exited with {returncode}"
    # Nix could not even start the build (store locked, daemon gone, bad args):
    # an infrastructure problem, worth a retry
    return Outcome.aborted, message or f"nix-store exited with {returncode}"


def has_failed_marker(output_paths: Sequence[str]) -> bool:
    return any(Path(p, "nix-support", "failed").exists() for p in output_paths)


async def realise(
    drv_path: str,
    *,
    env: Mapping[str, str],
    timeout: int | None,
    max_silent: int | None,
    max_log_size: int,
    on_log: Callable[[bytes], Awaitable[None]],
    extra_args: Sequence[str] = (),
    cores: int = 0,
    cancel: asyncio.Event | None = None,
    output_paths: Sequence[str] = (),
) -> RealiseResult:
    """Build one derivation, streaming its log to ``on_log`` in chunks."""
    # SIGTERM, not SIGKILL, when the agent dies (kill -9 included): Nix then kills the
    # builders it started in their own sessions; a killed nix-store leaves them building
    # on, and a restarted agent could be given the same step beside them
    argv = killed_with_parent(build_argv([drv_path], timeout=timeout, max_silent=max_silent,
                                         extra_args=extra_args, cores=cores), "TERM")
    started = time.time()
    oom_before = host_oom_kills()
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        stdin=asyncio.subprocess.DEVNULL, env=dict(env), start_new_session=True)
    assert process.stdout is not None
    log_bytes = 0
    tail = bytearray()
    log_limit_hit = False
    cancelled = False

    def kill_group() -> None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    async def watch_cancel() -> None:
        nonlocal cancelled
        if cancel is None:
            return
        await cancel.wait()
        cancelled = True
        # SIGTERM first: Nix then kills its builders, which run in sessions (and, with
        # the sandbox, PID namespaces) of their own; SIGKILL to the group alone would
        # leave them building on, orphaned
        try:
            os.killpg(process.pid, signal.SIGTERM)
            await asyncio.wait_for(process.wait(), CANCEL_GRACE_SECS)
        except (ProcessLookupError, TimeoutError):
            pass
        kill_group()

    watcher = asyncio.ensure_future(watch_cancel())
    try:
        while True:
            chunk = await process.stdout.read(LOG_CHUNK)
            if not chunk:
                break
            if log_bytes + len(chunk) > max_log_size:
                chunk = chunk[: max(0, max_log_size - log_bytes)]
                log_limit_hit = True
            log_bytes += len(chunk)
            tail = (tail + chunk)[-8192:]
            if chunk:
                await on_log(chunk)
            if log_limit_hit:
                kill_group()
                break
        returncode = await process.wait()
    except BaseException:
        kill_group()
        await process.wait()
        raise
    finally:
        watcher.cancel()
        # nothing the build started may outlive it
        kill_group()
    tail_text = tail.decode(errors="replace")
    outcome, message = classify(
        returncode, tail_text, log_limit_hit=log_limit_hit, cancelled=cancelled,
        oom_before=oom_before, oom_after=host_oom_kills(),
        failed_marker=returncode == 0 and has_failed_marker(output_paths))
    return RealiseResult(outcome, returncode, started, time.time(), log_bytes,
                         "\n".join(tail_text.splitlines()[-40:]), message)
