"""circus-admin against a running circus-server: commands, output and exit codes."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from tests.api.live import ADMIN_KEY, LiveServer, live_server
from tests.helpers.daemons import circus_command
from tests.helpers.net import free_port


@pytest.fixture(scope="module")
def server(engine: Engine, database_url: str, redis_url: str,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with live_server(engine, database_url, redis_url,
                     tmp_path_factory.mktemp("live-cli")) as running:
        yield running


def bare_env() -> dict[str, str]:
    """No CIRCUS_* of the caller; PYTHONPATH kept (a worktree's code under test)."""
    env = {"PATH": "/usr/bin:/bin"}
    if os.environ.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return env


def admin(server: LiveServer, *args: str, key: str | None = ADMIN_KEY
          ) -> subprocess.CompletedProcess[str]:
    env = {**bare_env(), "CIRCUS_URL": server.url}
    if key is not None:
        env["CIRCUS_API_KEY"] = key
    return subprocess.run([circus_command("circus-admin"), *args], capture_output=True,
                          text=True, env=env, timeout=60)


def ok(server: LiveServer, *args: str) -> str:
    done = admin(server, *args)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_projects_jobsets_and_tables(server: LiveServer) -> None:
    ok(server, "projects", "create", "cli", "--repository-url", "file:///srv/cli",
       "--description", "from the CLI")
    table = ok(server, "projects", "list")
    assert table.splitlines()[0].split()[:3] == ["ID", "NAME", "ENABLED"]
    assert "cli" in table
    ok(server, "jobsets", "create", "--project", "cli", "main", "--branch", "main",
       "--check-interval", "45")
    jobsets = json.loads(ok(server, "--json", "jobsets", "list", "--project", "cli"))
    assert [(j["name"], j["branch"], j["check_interval"]) for j in jobsets] == [
        ("main", "main", 45)]
    # the global options also after the command, as docs/USAGE.md writes them
    # (`circus-admin builds list --json | jq ...`)
    assert json.loads(ok(server, "jobsets", "list", "--project", "cli", "--json")) == jobsets
    assert json.loads(ok(server, "builds", "list", "--json")) == []
    elsewhere = admin(server, "projects", "list", "--url", server.url, "--api-key", "nope",
                      key=None)
    assert elsewhere.returncode == 3, elsewhere.stderr
    duplicate = admin(server, "projects", "create", "cli")
    assert duplicate.returncode == 5
    assert "already exists" in duplicate.stderr
    missing = admin(server, "jobsets", "list", "--project", "nope")
    assert missing.returncode == 4
    ok(server, "jobsets", "delete", "--project", "cli", "main")
    ok(server, "projects", "delete", "cli")
    assert json.loads(ok(server, "--json", "projects", "list")) == []


def test_users_keys_and_permissions(server: LiveServer) -> None:
    ok(server, "users", "create", "erin", "--password", "erins password", "--role",
       "read-only")
    ok(server, "users", "set-role", "erin", "create-projects")
    users = json.loads(ok(server, "--json", "users", "list"))
    assert {u["username"]: u["role"] for u in users}["erin"] == "create-projects"
    created = json.loads(ok(server, "--json", "api-keys", "create", "erin-key", "--owner",
                            "erin", "--role", "create-projects"))
    erin_key = created["key"]
    # erin may create projects but not users
    assert admin(server, "projects", "create", "erins", key=erin_key).returncode == 0
    # the reasons are lines naming the field, not a Python dict
    local = admin(server, "projects", "create", "erins2", "--repository-url", "/srv/erin",
                  key=erin_key)
    assert local.returncode == 3
    assert "\n  repository_url: '/srv/erin' is on the server's disk" in local.stderr
    assert "{" not in local.stderr
    denied = admin(server, "users", "create", "mallory", key=erin_key)
    assert denied.returncode == 3
    ok(server, "users", "disable", "erin")
    assert admin(server, "projects", "list", key=erin_key).returncode == 3
    ok(server, "users", "enable", "erin")
    ok(server, "api-keys", "revoke", str(created["id"]))
    assert admin(server, "projects", "list", key=erin_key).returncode == 3
    keys = json.loads(ok(server, "--json", "api-keys", "list", "--all"))
    assert any(k["name"] == "erin-key" and k["revoked_at"] for k in keys)
    assert admin(server, "projects", "list", key=None).returncode == 3
    audit = ok(server, "audit", "--action", "api_key.revoke")
    assert "key:live-admin" in audit
    ok(server, "users", "delete", "erin")


def test_builders_builds_notifications_config(server: LiveServer, tmp_path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")],
                   check=True)
    host_key = (tmp_path / "k.pub").read_text().strip()
    keyscan = tmp_path / "fast.keys"
    keyscan.write_text(f"fast {host_key}\n")
    bad = admin(server, "builders", "add", "slow", "ssh://nix@slow", "--public-host-key",
                "ssh-ed25519 notakey")
    assert bad.returncode != 0
    assert "public_host_key" in bad.stderr
    ok(server, "builders", "add", "fast", "ssh://nix@fast", "--systems", "x86_64-linux",
       "--max-jobs", "4", "--features", "kvm", "--ssh-key-file", "/run/keys/fast",
       "--public-host-key", f"@{keyscan}")
    ok(server, "builders", "disable", "fast")
    builders = json.loads(ok(server, "--json", "builders", "list"))
    assert [(b["name"], b["enabled"], b["supported_features"]) for b in builders] == [
        ("fast", False, ["kvm"])]
    assert builders[0]["public_host_key"] == f"fast {host_key}"
    assert builders[0]["ssh_key_file"] == "/run/keys/fast"
    assert builders[0]["current_jobs"] == 0
    ok(server, "builders", "remove", "fast")
    assert ok(server, "builders", "sessions", "--connected").strip() == "(none)"
    assert admin(server, "builders", "session", "nope").returncode == 4
    assert json.loads(ok(server, "--json", "builds", "list")) == []
    assert admin(server, "builds", "show", "12345").returncode == 4
    assert json.loads(ok(server, "--json", "notifications", "list")) == []
    config = json.loads(ok(server, "--json", "config", "get"))
    assert config["config"]["server"]["secret_key"] == "<redacted>"
    # for people: a header line, then the settings indented one per line
    header, _, shown = ok(server, "config", "get").partition("\n")
    assert header.startswith("# config file: ")
    assert json.loads(shown) == config["config"]
    assert len(shown.splitlines()) > 20
    bad = admin(server, "config", "apply", "/dev/null")
    assert bad.returncode == 5
    assert "disabled" in bad.stderr
    status = json.loads(ok(server, "--json", "status"))
    assert status["builds"]["total"] == 0


def test_health_and_unreachable_server(server: LiveServer, tmp_path: Path) -> None:
    assert "database: ok" in ok(server, "health")
    env = bare_env()
    down = subprocess.run([circus_command("circus-admin"), "--url",
                           f"http://127.0.0.1:{free_port()}", "projects", "list"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert down.returncode == 6
    assert "cannot reach" in down.stderr
    # health asks /health itself (a 503 still has a body to show): the same exit code
    down = subprocess.run([circus_command("circus-admin"), "--url",
                           f"http://127.0.0.1:{free_port()}", "health"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert down.returncode == 6, down.stderr
    assert "cannot reach" in down.stderr


def test_api_docs_check_detects_drift(tmp_path: Path) -> None:
    stale = tmp_path / "API.md"
    stale.write_text("# old\n")
    done = subprocess.run([circus_command("circus-admin"), "dev", "api-docs", "--check",
                           "--output", str(stale)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "out of date" in done.stdout
    subprocess.run([circus_command("circus-admin"), "dev", "api-docs", "--output", str(stale)],
                   check=True, capture_output=True, timeout=120)
    done = subprocess.run([circus_command("circus-admin"), "dev", "api-docs", "--check",
                           "--output", str(stale)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout
