"""Nothing an agent started builds on after the agent is killed (``kill -9``).

Nix puts each builder into a session of its own, so a killed ``nix-store`` leaves
its builder running, and a restarted agent could be given the same step beside
it. The agent's ``realise`` runs ``nix-store`` with a death signal (SIGTERM: Nix
then kills its builders before it exits). The test kills a real process that is
building through that code path and looks for survivors in ``/proc``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from circus.common.nix.process import killed_with_parent
from circus.queue_runner.local.procs import builders_of, kill_tree
from tests.helpers.daemons import wait_until
from tests.queue_runner.factories import instantiate

JOBS = Path(__file__).parent / "fixtures" / "jobs.nix"

#: what the agent does for one assignment, minus the RPC around it
BUILDING_PROCESS = textwrap.dedent("""
    import asyncio, os, sys
    from circus.common.nix.realise import realise

    async def main():
        async def on_log(chunk):
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
        await realise(sys.argv[1], env=dict(os.environ), timeout=None, max_silent=None,
                      max_log_size=1 << 20, on_log=on_log)

    asyncio.run(main())
""")


def nix_store_of(drv: str) -> list[int]:
    """``nix-store`` processes realising ``drv``."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            argv = Path(f"/proc/{name}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"nix-store") and drv.encode() in argv:
            found.append(int(name))
    return found


def clean_up(drv: str, out: str) -> None:
    """Kill what this test's build left (found by its own drv and output paths only)."""
    for pid in [*nix_store_of(drv), *builders_of({"out": out})]:
        kill_tree(pid)


def output_of(drv: str, env: dict[str, str]) -> str:
    return subprocess.run(["nix-store", "-q", "--outputs", drv], capture_output=True,
                          text=True, env=env, check=True).stdout.strip()


def test_a_killed_agent_leaves_no_nix_store_or_builder(
        nix_env: dict[str, str], nonce: str, tmp_path: Path) -> None:
    drv = instantiate(["long"], nonce, nix_env, expr=JOBS)["long"]
    out = output_of(drv, nix_env)
    log_path = tmp_path / "build.log"
    with log_path.open("wb") as log:
        # in a session of its own like the agent daemon, so only it gets the SIGKILL
        building = subprocess.Popen(
            [sys.executable, "-c", BUILDING_PROCESS, drv], stdout=log,
            stderr=subprocess.STDOUT, env={**nix_env, "PYTHONPATH": os.getcwd()},
            start_new_session=True)
    try:
        wait_until(lambda: b"long start" in log_path.read_bytes(), timeout=60,
                   message="the builder started")
        builders = builders_of({"out": out})
        assert builders, "the builder is found by its out= variable"
        assert nix_store_of(drv)
        os.kill(building.pid, signal.SIGKILL)
        building.wait(10)
        wait_until(lambda: not nix_store_of(drv) and not builders_of({"out": out}),
                   timeout=15, message="nix-store and its builder gone")
    finally:
        clean_up(drv, out)
        if building.poll() is None:
            building.kill()


def test_without_the_death_signal_the_builder_would_survive(
        nix_env: dict[str, str], nonce: str, tmp_path: Path) -> None:
    """The control: the same kill without ``--pdeathsig`` leaves both behind, so the
    test above can fail."""
    drv = instantiate(["long"], nonce, nix_env, expr=JOBS)["long"]
    out = output_of(drv, nix_env)
    argv = ["nix-store", "--realise", drv]
    assert killed_with_parent(argv, "TERM")[1:3] == ["--pdeathsig", "TERM"]
    parent = subprocess.Popen(
        [sys.executable, "-c",
         "import subprocess, sys, time; subprocess.Popen(sys.argv[1:], "
         "start_new_session=True); time.sleep(600)", *argv],
        env=nix_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    try:
        # the builder's shell and its sleep (inheriting out=): "long start" was written,
        # so the builder cannot die of SIGPIPE when nix-store goes
        wait_until(lambda: len(builders_of({"out": out})) >= 2, timeout=60,
                   message="the builder sleeps")
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        for pid in nix_store_of(drv):
            os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not nix_store_of(drv), timeout=10, message="nix-store killed")
        assert builders_of({"out": out}), "a builder outlives its killed nix-store"
    finally:
        clean_up(drv, out)
        if parent.poll() is None:
            parent.kill()
