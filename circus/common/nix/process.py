"""Run external programs in their own process group, so timeouts kill everything they spawned."""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@functools.cache
def _setpriv() -> str | None:
    return shutil.which("setpriv")


def dying_with_parent(argv: Sequence[str], death_signal: str = "KILL") -> list[str]:
    """``argv`` run so that it gets ``death_signal`` when the thread that started it
    dies, ``kill -9`` included (``setpriv --pdeathsig``; unchanged without setpriv).

    A process started with ``start_new_session`` is out of reach of its parent's
    process group: without this, it outlives a killed daemon.
    """
    setpriv = _setpriv()
    if setpriv is None:
        return list(argv)
    return [setpriv, "--pdeathsig", death_signal, "--", *argv]


@dataclass
class ProcessResult:
    returncode: int
    stdout: str
    stderr: str
    timed_out: bool = False


def kill_process_group(process: subprocess.Popen[bytes] | subprocess.Popen[str],
                       sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass


def run(
    argv: Sequence[str],
    *,
    timeout: float | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    input_text: str | None = None,
) -> ProcessResult:
    """Run to completion; on timeout the whole process group is killed."""
    process = subprocess.Popen(
        list(argv),
        stdin=subprocess.PIPE if input_text is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(env) if env is not None else None,
        cwd=cwd,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(input_text, timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_process_group(process)
        stdout, stderr = process.communicate()
        return ProcessResult(process.returncode, stdout, stderr, timed_out=True)
    except BaseException:
        kill_process_group(process)
        process.wait()
        raise
    return ProcessResult(process.returncode, stdout, stderr)
