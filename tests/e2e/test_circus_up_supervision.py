"""``circus up`` supervises its daemons and private services and leaves no orphans: kill -9
of a daemon, of Redis and PostgreSQL, of ``circus up`` itself, of everything during a build.

(A file of its own, apart from tests/e2e/test_circus_up.py, so that the two long
``circus up`` tests can run on two pytest workers at once.)
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.circus_up import Client, alive, health, health_ok, pids_of, postgres_home, start
from tests.helpers.daemons import circus_command, wait_until
from tests.helpers.net import free_port

pytestmark = pytest.mark.slow


def test_circus_up_supervises_its_daemons_and_never_leaves_orphans(up_root: Path) -> None:
    # up_root removes the instance (and its PostgreSQL cluster) afterwards
    root = up_root
    state = root / "state"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CIRCUS_")}
    env["CIRCUS_SERVER__PORT"] = str(port)
    # stdout is a pipe whose reader goes away later (make run | tee log, then Ctrl-C)
    up = subprocess.Popen([circus_command("circus"), "up", "--state-dir", str(state)],
                          env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          start_new_session=True)
    assert up.stdout is not None
    seen = ""
    try:
        deadline = time.monotonic() + 180
        # the admin password is printed after "Circus is running."
        while "admin / " not in seen and time.monotonic() < deadline:
            line = up.stdout.readline().decode(errors="replace")
            if not line:
                break
            seen += line
        assert "Circus is running." in seen, seen

        # kill -9 of one daemon: restarted, and /health counts the restart
        before = pids_of(state)
        os.killpg(before["circus-queue-runner"], signal.SIGKILL)
        wait_until(lambda: pids_of(state).get("circus-queue-runner") not in
                   (None, before["circus-queue-runner"]), timeout=30,
                   message="queue runner restarted")
        # the restart counts are details of /health: for an administrator
        login = re.search(r"login:\s+admin / (\S+)", seen)
        assert login, seen
        assert "supervisor" not in health(base)
        supervisor = Client(base, login.group(1)).get("/health")["supervisor"]["daemons"]
        assert supervisor["circus-queue-runner"]["restarts"] == 1
        assert supervisor["circus-queue-runner"]["last_exit"] == -signal.SIGKILL
        assert supervisor["circus-server"]["restarts"] == 0
        assert up.poll() is None

        # kill -9 of the private Redis and PostgreSQL: started again, the daemons reconnect
        os.kill(int((state / "redis" / "redis.pid").read_text()), signal.SIGKILL)
        home = postgres_home(state)
        os.kill(int((home / "data" / "postmaster.pid").read_text().split()[0]), signal.SIGKILL)
        log = state / "daemon-logs" / "circus-up.log"
        wait_until(lambda: "private Redis is not running; starting it again" in log.read_text()
                   and "private PostgreSQL is not running; starting it again" in log.read_text(),
                   timeout=60, message="private services restarted")
        wait_until(lambda: health_ok(base), timeout=60, message="healthy again")
        assert up.poll() is None

        # a second instance on the same state directory says who holds it, in one line
        second = subprocess.run([circus_command("circus"), "up", "--state-dir", str(state)],
                                env=env, cwd=root, capture_output=True, text=True, timeout=60)
        assert second.returncode == 1
        assert f"pid {up.pid}" in second.stderr, second.stderr
        assert base in second.stderr

        # the pipe's reader goes away; Ctrl-C still stops everything cleanly
        daemons = pids_of(state)
        up.stdout.close()
        os.kill(up.pid, signal.SIGINT)
        assert up.wait(60) == 0
        for name, pid in daemons.items():
            assert not alive(pid), name
        assert "stopping Circus" in (state / "daemon-logs" / "circus-up.log").read_text()
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()

    # a program on the port is named as such
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        refused = subprocess.run([circus_command("circus"), "up", "--state-dir", str(state)],
                                 env=env, cwd=root, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1
    assert f"port {port} on 127.0.0.1 is taken" in refused.stderr, refused.stderr

    # kill -9 of circus up itself takes its daemons down (no orphans holding the port)
    daemon, password, _ = start(state, port, root)
    try:
        daemons = pids_of(state)
        assert set(daemons) == {"circus-server", "circus-evaluator", "circus-queue-runner"}
        # the private PostgreSQL keeps Postgres's crash-safe defaults
        for setting in ("fsync", "synchronous_commit", "full_page_writes"):
            shown = subprocess.run(["psql", "-h", str(postgres_home(state) / "run"), "-U",
                                    "postgres", "-d", "circus", "-tAc", f"SHOW {setting}"],
                                   capture_output=True, text=True, check=True)
            assert shown.stdout.strip() == "on", setting
        daemon.kill(signal.SIGKILL)
        wait_until(lambda: not any(alive(pid) for pid in daemons.values()), timeout=60,
                   message="daemons gone after kill -9 of circus up")
    finally:
        daemon.stop()

    # kill -9 of everything (daemons, Redis, PostgreSQL, circus up) during a build:
    # the next start has everything and finishes the build, once
    crashed, _, _ = start(state, port, root)
    nonce = secrets.token_hex(4)
    try:
        client = Client(base, password)
        _add_sleeping_job(state / "demo-repo", nonce)
        client.post("/api/v1/evaluations/trigger", {"project": "demo", "jobset": "main"})
        wait_until(lambda: _crash_builds(client) and _crash_builds(client)[0]["status"]
                   == "running", timeout=120, interval=0.5, message="the new job building")
        for pid in pids_of(state).values():
            os.killpg(pid, signal.SIGKILL)
        os.kill(int((state / "redis" / "redis.pid").read_text()), signal.SIGKILL)
        home = postgres_home(state)
        os.kill(int((home / "data" / "postmaster.pid").read_text().split()[0]), signal.SIGKILL)
        crashed.kill(signal.SIGKILL)
        wait_until(lambda: subprocess.run(["pgrep", "-f", str(home / "data")],
                                          capture_output=True).returncode != 0,
                   timeout=60, message="PostgreSQL gone")
    finally:
        crashed.stop()
    again, _, _ = start(state, port, root)
    try:
        client = Client(base, password)
        assert [p["name"] for p in client.get("/api/v1/projects")["items"]] == ["demo"]
        wait_until(lambda: _crash_builds(client)[0]["finished"], timeout=120, interval=1,
                   message="the interrupted build finished after the restart")
        builds = _crash_builds(client)
        assert len(builds) == 1
        assert builds[0]["status"] == "succeeded"
        with open(builds[0]["outputs"]["out"]) as out:
            assert out.read().strip() == nonce
    finally:
        again.stop()


def _add_sleeping_job(repo: Path, nonce: str) -> None:
    flake = repo / "flake.nix"
    flake.write_text(flake.read_text().replace(
        "inherit greeting hello slow;",
        f'inherit greeting hello slow;\n        crash = shell "crash-{nonce}" '
        f"''sleep 8; echo {nonce} > $out'' {{ }};"))
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@localhost",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@localhost"}
    subprocess.run(["git", "commit", "-qam", "a job to crash in"], cwd=repo, env=env, check=True)


def _crash_builds(client: Client) -> list[Any]:
    return list(client.get("/api/v1/builds?job_name=crash&limit=10")["items"])
