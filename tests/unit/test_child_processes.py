"""Children of a daemon die with it (``process.killed_with_parent``), even by kill -9."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from circus.common.nix.process import PARENT_CHECK, killed_with_parent
from tests.helpers.daemons import wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _children(parent: int, comm: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if (int(stat.rsplit(")", 1)[1].split()[1]) == parent
                    and stat[stat.index("(") + 1:stat.rindex(")")] == comm):
                found.append(int(entry.name))
    return found


def test_argv_is_wrapped_in_setpriv() -> None:
    argv = killed_with_parent(["git", "fetch"])
    assert argv[1:3] == ["--pdeathsig", "KILL"]
    assert argv[3:] == ["--", "/bin/sh", "-c", PARENT_CHECK, str(os.getpid()), "git", "fetch"]


def test_a_child_whose_parent_died_before_the_death_signal_was_set_never_starts(
        tmp_path: Path) -> None:
    """The race setpriv leaves (found by tests/faults: a nix-store orphaned by kill -9 of
    the queue runner built on): the caller dies after the fork, before the signal is
    set, and the child's parent is someone else by the time it would exec. Made
    deterministic by running argv made here from another process: the program must
    not run, and the same argv run from here must."""
    marker = tmp_path / "ran"
    argv = killed_with_parent(["/bin/sh", "-c", 'echo ran > "$0"', str(marker)])
    other = subprocess.run([sys.executable, "-c",
                            "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))",
                            *argv], check=False)
    assert other.returncode != 0
    assert not marker.exists()
    assert subprocess.run(argv, check=False).returncode == 0
    assert marker.read_text() == "ran\n"


@pytest.mark.parametrize("how", ["process.run", "proc.stream"])
def test_a_child_started_from_a_thread_dies_with_its_killed_parent(how: str) -> None:
    """Both run their program in a session of its own (so a timeout kills its group),
    out of reach of the daemon's own process group; started from a worker thread, as the
    evaluator's Celery threads and the queue runner's workers do."""
    call = ("process.run(['sleep', '300'])" if how == "process.run"
            else "proc.stream(['sleep', '300'])")
    program = textwrap.dedent(f"""
        import threading
        from circus.common.nix import process
        from circus.evaluator import proc
        thread = threading.Thread(target=lambda: {call})
        thread.start()
        thread.join()
    """)
    parent = subprocess.Popen([sys.executable, "-c", program],
                              env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    try:
        found: list[int] = []

        def started() -> bool:
            # ``sleep``, not ``setpriv``: the signal is set before the exec
            found[:] = _children(parent.pid, "sleep")
            return bool(found)

        wait_until(started, timeout=30, interval=0.02, message="the child started")
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        wait_until(lambda: not any(_alive(pid) for pid in found), timeout=10, interval=0.05,
                   message="the child gone with its parent")
    finally:
        parent.kill()
        for pid in found:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
