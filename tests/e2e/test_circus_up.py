"""``circus up`` (what ``make run`` starts): a working instance from nothing, reused after."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import urllib.request
from pathlib import Path

import pytest

from circus.common.localservices import PrivatePostgres
from tests.cache.support import nix_copy, store_has
from tests.helpers.circus_up import Client, removed_afterwards, start
from tests.helpers.daemons import circus_command, wait_until
from tests.helpers.net import free_port

pytestmark = pytest.mark.slow


def circus_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CIRCUS_")}
    return subprocess.run([circus_command("circus"), *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=180)


def _tree(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in directory.rglob("*") if p.is_file()}


def demo_state(client: Client) -> tuple[str, list[str]]:
    evaluations = client.get("/api/v1/evaluations?limit=5")["items"]
    builds = client.get("/api/v1/builds?limit=50")["items"]
    status = evaluations[0]["status"] if evaluations else "none"
    return status, sorted(f"{b['job_name']}:{b['status']}" for b in builds)


def test_circus_up_from_nothing_then_again(tmp_path: Path) -> None:
    # a state directory the postgres user cannot reach (pytest's base is 0700, as /root
    # for a user's ~/.circus): the cluster lives elsewhere, and is found again
    root = Path(tmp_path)
    root.chmod(0o755)
    state = root / "state"
    port = free_port()
    base = f"http://127.0.0.1:{port}"

    restored = root / "restored"
    # the instances are removed however the test ends; the cluster of each lives in
    # /var/lib/circus/postgres-<digest> (the postgres user cannot reach pytest's 0700
    # base directory, as a state directory under /root): it goes too
    with removed_afterwards(state, restored):
        daemon, password, first_start = start(state, port, root)
        home = PrivatePostgres(state / "postgres").home
        try:
            # the fallback: named where circus up starts it, and naming its owner
            assert not home.is_relative_to(state), home
            assert f"its data lives in {home}" in daemon.log()
            assert (home / "OWNER").read_text().strip() == str(state / "postgres")
            # the key for a Nix client's trusted-public-keys is printed with the login
            printed_key = re.search(r"cache key:\s+(\S+)", daemon.log())
            assert printed_key, daemon.log()
            assert printed_key.group(1) == (state / "signing-key.pub").read_text().strip()
            with urllib.request.urlopen(base + "/health", timeout=10) as response:
                health = json.load(response)
            assert response.status == 200
            assert health["database"]["ok"]
            assert health["broker"]["ok"]
            client = Client(base, password)
            projects = [p["name"] for p in client.get("/api/v1/projects")["items"]]
            assert projects == ["demo"]
            wanted = ["greeting:succeeded", "hello:succeeded", "release:succeeded",
                      "slow:succeeded"]
            wait_until(lambda: demo_state(client) == ("completed", wanted), timeout=120,
                       interval=1, message="demo evaluated and built")
            assert {"evaluator", "queue-runner"} <= {d["kind"] for d in health["daemons"]}
            demo_builds = client.get("/api/v1/builds?limit=50")["items"]
            hello = next(b for b in demo_builds if b["job_name"] == "hello")
            # outputs already in the store (an earlier run on this machine) have no log
            logs = {b["id"]: client.text(f"/api/v1/builds/{b['id']}/log") for b in demo_builds}
            # the binary cache serves what the demo built, signed with the instance's key
            with urllib.request.urlopen(base + "/nix-cache/nix-cache-info", timeout=10) as r:
                assert b"StoreDir: /nix/store" in r.read()
        finally:
            assert daemon.process is not None
            daemon.process.send_signal(signal.SIGTERM)
            assert daemon.process.wait(60) == 0, daemon.log()[-3000:]
        assert "stopping Circus" in daemon.log()
        # nothing of the instance is left running (PostgreSQL may live outside the state
        # directory when the postgres user cannot reach it, as under pytest's 0700 base)
        for place in {str(state), str(PrivatePostgres(state / "postgres").home)}:
            leftovers = subprocess.run(["pgrep", "-f", place], capture_output=True, text=True)
            assert leftovers.stdout.strip() == "", (place, leftovers.stdout)

        # backed up, then restored into a fresh state directory
        backup_dir = root / "backup"
        done = circus_cli("backup", str(backup_dir), "--state-dir", str(state), cwd=root)
        assert done.returncode == 0, done.stderr
        assert backup_dir.stat().st_mode & 0o777 == 0o700   # it holds the signing key
        done = circus_cli("restore", str(backup_dir), "--state-dir", str(restored), cwd=root)
        assert done.returncode == 0, done.stderr
        refused = circus_cli("restore", str(backup_dir), "--state-dir", str(restored), cwd=root)
        assert refused.returncode == 1
        assert "already holds a database" in refused.stderr

        # the restored instance has the same admin, database, logs and signed cache
        again, password_again, second_start = start(restored, port, root)
        restored_home = PrivatePostgres(restored / "postgres").home
        try:
            assert password_again == password
            client = Client(base, password)
            status, builds = demo_state(client)
            assert status == "completed"
            assert builds == wanted
            assert {b: client.text(f"/api/v1/builds/{b}/log") for b in logs} == logs
            assert _tree(restored / "logs") == _tree(state / "logs")
            out = hello["outputs"]["out"]
            public_key = (restored / "signing-key.pub").read_text().strip()
            assert public_key == (state / "signing-key.pub").read_text().strip()
            copied = nix_copy(base + "/nix-cache", [out], public_key, root / "client" / "store")
            assert copied.returncode == 0, copied.stderr
            assert store_has(root / "client" / "store", out)
        finally:
            assert again.process is not None
            again.process.send_signal(signal.SIGTERM)
            assert again.process.wait(60) == 0
    # and nothing of either instance is left behind
    assert not home.exists()
    assert not restored_home.exists()
    assert not state.exists()
    print(f"circus up: first start {first_start:.1f} s, second start {second_start:.1f} s")


def test_circus_up_with_the_example_config(up_root: Path) -> None:
    """``make run CIRCUS_CONFIG_FILE=deploy/circus.example.toml``: it starts with private
    services (the example names no database or broker), applies the example's declarative
    project and key, and the printed admin login works (the example's admin has no
    password: ``circus up`` gives it the state's)."""
    root = up_root   # removes the instance afterwards
    state = root / "state"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    example = Path(__file__).resolve().parents[2] / "deploy" / "circus.example.toml"
    # the example's directories are a production host's (/var/lib/circus): keep them here
    env = {"CIRCUS_CONFIG_FILE": str(example),
           "CIRCUS_EVALUATOR__WORK_DIR": str(state / "evaluator"),
           "CIRCUS_LOGS__LOG_DIR": str(state / "logs"),
           "CIRCUS_CACHE__CACHE_DIR": str(state / "cache"),
           "CIRCUS_GC__GC_ROOTS_DIR": str(state / "gcroots")}
    daemon, password, _ = start(state, port, root, extra_env=env)
    try:
        client = Client(base, password)
        assert client.get("/api/v1/me")["role"] == "admin"
        projects = client.get("/api/v1/projects")["items"]
        assert [p["name"] for p in projects] == ["example"]
        # the example's deploy key works as the example says
        request = urllib.request.Request(
            base + "/api/v1/projects",
            headers={"Authorization": "Bearer change-me-to-a-long-random-secret"})
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200
        # signing is off in the example: no key to print
        assert "cache key:" not in daemon.log()
    finally:
        assert daemon.process is not None
        daemon.process.send_signal(signal.SIGTERM)
        assert daemon.process.wait(60) == 0, daemon.log()[-3000:]
