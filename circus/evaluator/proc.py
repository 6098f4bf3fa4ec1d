"""Run an evaluation program while reading its output line by line.

The program runs in its own process group; a deadline, a cancellation check or
any error kills the whole group, and so does the program's normal exit (nothing
it spawned outlives it). It also dies with the evaluator thread that started it,
even when the evaluator is killed with SIGKILL (:func:`killed_with_parent`).
"""

from __future__ import annotations

import codecs
import collections
import fcntl
import io
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, cast

from circus.common.nix.process import killed_with_parent

LineHandler = Callable[[str], bool]
"""Called with each line (without the newline); returns True to keep it in the tail."""

TAIL_LINES = 60


class Stopped(Exception):
    """The run was stopped before the program finished."""

    def __init__(self, reason: str, tail: str) -> None:
        super().__init__(reason)
        self.reason = reason  # "timeout" | "cancelled"
        self.tail = tail


@dataclass
class Finished:
    returncode: int
    stdout_tail: str
    stderr_tail: str


#: bytes asked of a pipe per read, and the pipe's size where Linux lets us set it
READ_SIZE = 1 << 20
#: a read that returned less than this found the pipe drained: the reader naps
SMALL_READ = 1 << 14
#: how long; Nix writes a trace line per job (~5,000 a second at 50,000 jobs), and
#: waking for each line cost ~40 us of the evaluator's CPU per job on a loaded
#: machine (the reader thread and the importer handing the GIL to each other); after
#: a nap a read takes ~50 lines at once. The pipe (1 MiB) holds far more than Nix
#: writes in a nap, so Nix never waits for the reader.
NAP = 0.01


def _pump(stream: IO[str], handler: LineHandler | None,
          tail: collections.deque[str], errors: list[BaseException]) -> None:
    """Read ``stream``'s pipe in large chunks, decoded as the text stream would be
    (its encoding and error handler, universal newlines), handing each line on."""
    fd = stream.fileno()
    if hasattr(fcntl, "F_SETPIPE_SZ"):
        try:
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, READ_SIZE)
        except OSError:
            pass  # over /proc/sys/fs/pipe-max-size: the default size works, more slowly
    # what the text stream would decode with (Popen's text=True, errors="replace")
    text = cast(io.TextIOWrapper, stream)
    decoder = io.IncrementalNewlineDecoder(
        codecs.getincrementaldecoder(text.encoding)(errors=text.errors or "strict"),
        translate=True)
    #: the start of a line whose end has not come yet (in pieces: it may be long)
    pending: list[str] = []
    try:
        while True:
            chunk = os.read(fd, READ_SIZE)
            decoded = decoder.decode(chunk, final=not chunk)
            if "\n" not in decoded and chunk:
                pending.append(decoded)
                lines = []
            else:
                pending.append(decoded)
                lines = "".join(pending).split("\n")
                pending = [lines.pop()]
            if not chunk and pending[0]:
                lines.append(pending[0])  # the last line, without its newline
            for line in lines:
                keep = handler(line) if handler is not None else True
                if keep:
                    tail.append(line)
            if not chunk:
                return
            if len(chunk) < SMALL_READ:
                time.sleep(NAP)
    except BaseException as exc:  # report to the caller's thread
        errors.append(exc)
        # keep draining so the program never blocks on a full pipe
        while os.read(fd, READ_SIZE):
            pass


def kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def stream(argv: Sequence[str], *, env: Mapping[str, str] | None = None,
           cwd: str | None = None, deadline: float | None = None,
           should_stop: Callable[[], bool] | None = None,
           on_stdout: LineHandler | None = None, on_stderr: LineHandler | None = None,
           poll_interval: float = 0.5) -> Finished:
    """Run ``argv``, feeding its lines to the handlers; raise :class:`Stopped`.

    ``deadline`` is a ``time.monotonic()`` value. ``should_stop`` is polled every
    ``poll_interval`` seconds (it may query the database).
    """
    process = subprocess.Popen(
        killed_with_parent(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, env=dict(env) if env is not None else None, cwd=cwd,
        text=True, errors="replace", bufsize=1 << 16, start_new_session=True)
    out_tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    err_tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    errors: list[BaseException] = []
    assert process.stdout is not None
    assert process.stderr is not None
    pumps = [
        threading.Thread(target=_pump, args=(process.stdout, on_stdout, out_tail, errors),
                         daemon=True, name="eval-stdout"),
        threading.Thread(target=_pump, args=(process.stderr, on_stderr, err_tail, errors),
                         daemon=True, name="eval-stderr"),
    ]
    for pump in pumps:
        pump.start()
    stopped: str | None = None
    try:
        while True:
            try:
                process.wait(timeout=poll_interval)
                break
            except subprocess.TimeoutExpired:
                pass
            if deadline is not None and time.monotonic() >= deadline:
                stopped = "timeout"
            elif errors:
                stopped = "error"
            elif should_stop is not None and should_stop():
                stopped = "cancelled"
            if stopped:
                kill_group(process.pid)
                process.wait()
                break
    except BaseException:
        kill_group(process.pid)
        process.wait()
        raise
    finally:
        # whatever the program started goes with it
        kill_group(process.pid)
    for pump in pumps:
        pump.join(timeout=30)
    if errors:
        raise errors[0]
    if stopped:
        raise Stopped(stopped, "\n".join(err_tail))
    return Finished(process.returncode, "\n".join(out_tail), "\n".join(err_tail))
