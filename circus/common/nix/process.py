"""Run external programs in their own process group, so timeouts kill everything they spawned.

Every long-running child of a daemon (Nix, git) is also started through
:func:`killed_with_parent`: a daemon killed by SIGKILL (the OOM killer, ``kill -9``)
cannot kill its children's groups itself, and a child in a session of its own
gets no signal from anybody else.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass
class ProcessResult:
    returncode: int
    stdout: str
    stderr: str
    timed_out: bool = False


@functools.cache
def _setpriv() -> str | None:
    return shutil.which("setpriv")


def killed_with_parent(argv: Sequence[str], death_signal: str = "KILL") -> list[str]:
    """``argv`` run so that the kernel sends it ``death_signal`` (SIGKILL unless told)
    when the thread that started it dies, ``kill -9`` included (``setpriv
    --pdeathsig``; unchanged where util-linux's ``setpriv`` is missing, e.g. macOS).
    A process started with ``start_new_session`` is out of reach of its parent's
    process group: without this, it outlives a killed daemon.

    ``setpriv`` sets the signal and execs the program (same pid), which also works
    when the caller runs threads, unlike a ``preexec_fn``. The signal is not
    inherited across fork: a program that forks workers must give them its own
    (Nix's ``startProcess`` does, nix-eval-jobs' workers included).
    (``localservices.die_with_parent`` is the in-process form, SIGTERM so a daemon can
    stop cleanly: ``circus up``'s daemons, and the evaluator's forked Celery beat.)

    The signal is set after the fork: a caller killed in between sends none, and the
    program would run on, orphaned (a ``nix-store`` started as the queue runner was
    killed built its batch on, the build's lines lost in a pipe nobody read). So
    ``setpriv`` runs a shell that starts the program only while the caller is still
    its parent (:data:`PARENT_CHECK`); argv must be run by the process that asked.
    """
    setpriv = _setpriv()
    if setpriv is None:
        return list(argv)
    return [setpriv, "--pdeathsig", death_signal, "--", "/bin/sh", "-c", PARENT_CHECK,
            str(os.getpid()), *argv]


#: run once the death signal is set, with the caller's pid as ``$0``: a parent that is
#: not the caller any more (it died before the signal was set) means exit, not exec
PARENT_CHECK = 'test "$PPID" = "$0" && exec "$@"'


def kill_process_group(process: subprocess.Popen[bytes] | subprocess.Popen[str],
                       sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass


@dataclass
class BinaryResult:
    returncode: int
    stdout: bytes
    stderr: bytes
    timed_out: bool = False


def run_binary(argv: Sequence[str], *, timeout: float | None = None,
               env: Mapping[str, str] | None = None) -> BinaryResult:
    """:func:`run` for a program whose output is bytes (a build log is not text)."""
    return BinaryResult(*_communicate(argv, timeout=timeout, env=env, text=False))


def run(
    argv: Sequence[str],
    *,
    timeout: float | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    input_text: str | None = None,
) -> ProcessResult:
    """Run to completion; on timeout the whole process group is killed, and the
    program dies with the caller (:func:`killed_with_parent`)."""
    return ProcessResult(*_communicate(argv, timeout=timeout, env=env, cwd=cwd,
                                       input_data=input_text, text=True))


def _communicate(argv: Sequence[str], *, timeout: float | None,
                 env: Mapping[str, str] | None, text: bool, cwd: str | None = None,
                 input_data: str | None = None) -> tuple[int, Any, Any, bool]:
    """(returncode, stdout, stderr, timed out) of ``argv`` in a session of its own."""
    process = subprocess.Popen(
        killed_with_parent(argv),
        stdin=subprocess.PIPE if input_data is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(env) if env is not None else None,
        cwd=cwd,
        text=text,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(input_data, timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_process_group(process)
        stdout, stderr = process.communicate()
        return process.returncode, stdout, stderr, True
    except BaseException:
        kill_process_group(process)
        process.wait()
        raise
    return process.returncode, stdout, stderr, False
