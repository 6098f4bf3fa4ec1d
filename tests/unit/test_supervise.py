"""The supervisor of ``circus up``: back-off between restarts, giving up on a crash loop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from circus.cli.supervise import GIVE_UP_AFTER, CrashLoop, Supervisor


def _wait_exit(supervisor: Supervisor) -> None:
    for daemon in supervisor.daemons:
        if daemon.process is not None:
            daemon.process.wait(10)


def test_a_crashing_daemon_is_restarted_with_back_off_then_given_up(tmp_path: Path) -> None:
    said: list[str] = []
    supervisor = Supervisor({"PATH": "/usr/bin:/bin"}, tmp_path / "status.json", said.append)
    supervisor.add("crasher", ["/bin/sh", "-c", "echo last words $$; exit 3"],
                   tmp_path / "crasher.log")
    supervisor.start_all()
    now = 1000.0
    delays = []
    daemon = supervisor.daemons[0]
    for _ in range(GIVE_UP_AFTER - 1):
        _wait_exit(supervisor)
        supervisor.poll(now)
        assert daemon.process is None
        assert daemon.restart_at is not None
        delays.append(daemon.restart_at - now)
        supervisor.poll(daemon.restart_at - 0.01)   # not yet due
        assert daemon.process is None
        now = daemon.restart_at
        supervisor.poll(now)                         # due: started again
        assert daemon.process is not None
        status = json.loads((tmp_path / "status.json").read_text())
        assert status["daemons"]["crasher"]["restarts"] == len(delays)
        assert status["daemons"]["crasher"]["last_exit"] == 3
    _wait_exit(supervisor)
    with pytest.raises(CrashLoop) as crash:
        supervisor.poll(now)
    assert delays == [2.0 ** n for n in range(GIVE_UP_AFTER - 1)]
    message = str(crash.value)
    assert f"crasher exited {GIVE_UP_AFTER} times" in message
    assert "last words" in message
    assert any("restarting in 1 s" in line for line in said)
    supervisor.stop_all()
    assert not (tmp_path / "status.json").exists()


def test_crashes_far_apart_never_add_up_to_a_crash_loop(tmp_path: Path) -> None:
    supervisor = Supervisor({"PATH": "/usr/bin:/bin"}, tmp_path / "status.json", lambda _: None)
    supervisor.add("flaky", ["/bin/sh", "-c", "exit 1"], tmp_path / "flaky.log")
    supervisor.start_all()
    now = 0.0
    for restart in range(1, GIVE_UP_AFTER * 2):
        _wait_exit(supervisor)
        supervisor.poll(now)
        daemon = supervisor.daemons[0]
        assert daemon.restart_at == now + 1.0   # the window forgot the older crashes
        supervisor.poll(daemon.restart_at)
        assert daemon.restarts == restart
        now += 1000.0
    supervisor.stop_all()
