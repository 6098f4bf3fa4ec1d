"""What ``circus up`` makes of the user's config before it starts anything."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

from circus.cli.up import Instance
from tests.helpers.daemons import circus_command
from tests.helpers.net import free_port


def test_an_agents_only_runner_host_is_a_valid_instance(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # database and broker given: ``prepare`` starts no private service
    monkeypatch.chdir(tmp_path)
    environ = {"CIRCUS_DATABASE__URL": "postgresql://circus@127.0.0.1:1/circus",
               "CIRCUS_BROKER__URL": "redis://127.0.0.1:1/0",
               "CIRCUS_QUEUE_RUNNER__WORKERS": "0"}
    instance = Instance(tmp_path / "state", environ)
    settings, child_env = instance.prepare()
    assert instance.postgres is None
    assert instance.redis is None
    assert settings.queue_runner.workers == 0
    # the daemons read the same value
    assert child_env["CIRCUS_QUEUE_RUNNER__WORKERS"] == "0"


def _prepared(tmp_path: Path, config: str | None) -> tuple[Instance, dict[str, str]]:
    environ = {"CIRCUS_DATABASE__URL": "postgresql://circus@127.0.0.1:1/circus",
               "CIRCUS_BROKER__URL": "redis://127.0.0.1:1/0"}
    if config is not None:
        (tmp_path / "circus.toml").write_text(config)
        environ["CIRCUS_CONFIG_FILE"] = str(tmp_path / "circus.toml")
    instance = Instance(tmp_path / "state", environ)
    return instance, instance.prepare()[1]


def test_the_admin_login_is_filled_in_unless_the_config_declares_users(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``make run CIRCUS_CONFIG_FILE=...`` with a config declaring projects but no users
    (deploy/circus.example.toml) printed 'login: admin / <password>' for a user it had
    not declared: nobody could log in."""
    monkeypatch.chdir(tmp_path)
    password_file = str(tmp_path / "state" / "admin-password")
    # nothing declared: the admin and the demo project
    instance, env = _prepared(tmp_path, None)
    assert instance.admin_declared
    assert [u["password_file"] for u in json.loads(env["CIRCUS_DECLARATIVE__USERS"])] == [
        password_file]
    assert [p["name"] for p in json.loads(env["CIRCUS_DECLARATIVE__PROJECTS"])] == ["demo"]
    # projects but no users: the admin, not the demo
    instance, env = _prepared(tmp_path, '[[declarative.projects]]\nname = "mine"\n'
                                        'repository_url = "https://git.example.org/m.git"\n')
    assert instance.admin_declared
    assert [u["username"] for u in json.loads(env["CIRCUS_DECLARATIVE__USERS"])] == ["admin"]
    assert "CIRCUS_DECLARATIVE__PROJECTS" not in env
    # the example config declares an admin without a password: it gets the state's
    example = Path(__file__).resolve().parents[2] / "deploy" / "circus.example.toml"
    instance, env = _prepared(tmp_path, example.read_text())
    assert instance.admin_declared
    assert json.loads(env["CIRCUS_DECLARATIVE__USERS"]) == [
        {"username": "admin", "role": "admin", "password_file": password_file}]
    # users with passwords of their own: those, and circus up prints no password
    instance, env = _prepared(tmp_path, '[[declarative.users]]\nusername = "admin"\n'
                                        'password = "theirs"\n[[declarative.users]]\n'
                                        'username = "root"\nrole = "admin"\n')
    assert not instance.admin_declared
    assert "CIRCUS_DECLARATIVE__USERS" not in env


def test_a_database_that_does_not_answer_is_one_clear_line(tmp_path: Path) -> None:
    """A configured database.url that refuses (no server, no such role) ended ``circus up``
    with two SQLAlchemy tracebacks; now one line naming the URL (password hidden)."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("CIRCUS_")},
           "CIRCUS_DATABASE__URL": f"postgresql://circus:sekrit@127.0.0.1:{free_port()}/circus",
           "CIRCUS_BROKER__URL": f"redis://127.0.0.1:{free_port()}/0",
           "CIRCUS_SERVER__PORT": str(free_port())}
    done = subprocess.run([circus_command("circus"), "up", "--state-dir",
                           str(tmp_path / "state")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert "error: cannot connect to the database postgresql://circus:***@127.0.0.1:" in \
        done.stderr
    assert "Connection refused" in done.stderr
    assert "sekrit" not in done.stdout + done.stderr


def _circus_up(tmp_path: Path, **environ: str) -> subprocess.CompletedProcess[str]:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("CIRCUS_")}, **environ}
    return subprocess.run([circus_command("circus"), "up", "--state-dir",
                           str(tmp_path / "state")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)


def test_a_config_typo_or_a_taken_port_stops_it_before_anything_starts(
        tmp_path: Path) -> None:
    """Both were reported after a private PostgreSQL had been made (initdb) and started,
    and Redis too, then both stopped again: seconds, and a database left behind."""
    config = tmp_path / "typo.toml"
    config.write_text("[server]\nprot = 3000\nworkers = 'four'\n")
    typo = _circus_up(tmp_path, CIRCUS_CONFIG_FILE=str(config))
    assert typo.returncode == 2, typo.stderr
    assert "server.prot: unknown key" in typo.stderr
    assert "server.workers: must be an integer (got 'four')" in typo.stderr
    assert "starting private PostgreSQL" not in typo.stdout
    assert not (tmp_path / "state" / "postgres").exists()

    with socket.socket() as holder:   # a second `make run`, or any other program
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        taken = _circus_up(tmp_path, CIRCUS_SERVER__PORT=str(port))
    assert taken.returncode == 1, taken.stderr
    assert f"error: port {port} on 127.0.0.1 is taken by another program" in taken.stderr
    assert "CIRCUS_SERVER__PORT" in taken.stderr
    assert "starting private PostgreSQL" not in taken.stdout
    assert not (tmp_path / "state" / "postgres").exists()
