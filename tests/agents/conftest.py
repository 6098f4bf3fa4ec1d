"""Agents with their own Nix store, and a gateway on a free port."""

from __future__ import annotations

import hashlib
import shlex
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from circus.common.config import Settings
from circus.gateway.runtime import GatewayThread
from tests.helpers.daemons import Daemon, circus_command
from tests.queue_runner.conftest import runner_config  # noqa: F401  (shared fixture)

TOKEN = "agent-token-" + "s" * 40
TOKEN_DIGEST = hashlib.sha256(TOKEN.encode()).hexdigest()


def write_agent_config(directory: Path, port: int, token: str = TOKEN,
                       address: str = "127.0.0.1", **extra: Any) -> Path:
    """``address``: where the agent reaches the gateway (a netns host's ``main_address``)."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = ["[agent]", f'runner_url = "tcp://{address}:{port}"', f'auth_token = "{token}"',
             f'work_dir = "{directory / "work"}"', "heartbeat_interval_secs = 0.5",
             "reconnect_delay_secs = 0.2", "substituters = []"]
    ephemeral = extra.pop("ephemeral", None)
    tracing = extra.pop("tracing", None)
    for key, value in extra.items():
        lines.append(f"{key} = {_toml(value)}")
    if ephemeral:
        lines.append("[agent.ephemeral]")
        lines += [f"{key} = {_toml(value)}" for key, value in ephemeral.items()]
    # Agents on one test host share the kernel's users: with nixbld build users,
    # Nix in one agent's private store would kill another agent's builder when
    # it cleans up "its" build user. Real agents are separate machines.
    lines += ["[agent.nix_config]", '"build-users-group" = ""']
    if tracing:
        lines.append("[tracing]")
        lines += [f"{key} = {_toml(value)}" for key, value in tracing.items()]
    path = directory / "agent.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return str(value)


def agent_in_own_store(name: str, directory: Path, config: Path, *args: str) -> Daemon:
    """An agent whose /nix is a private bind mount: paths really have to travel."""
    store = directory / "nix"
    store.mkdir(parents=True, exist_ok=True)
    inner = " ".join(shlex.quote(a) for a in
                     [circus_command("circus-agent"), "--config", str(config), *args])
    script = f"mount --bind {shlex.quote(str(store))} /nix && exec {inner}"
    return Daemon(name, ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                  directory)


def store_has(directory: Path, path: str) -> bool:
    """Is ``path`` valid in the agent store under ``directory``?"""
    script = (f"mount --bind {shlex.quote(str(directory / 'nix'))} /nix && "
              f"nix-store --check-validity {shlex.quote(path)}")
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                          capture_output=True)
    return done.returncode == 0


@pytest.fixture
def gateway_settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings(queue_runner={"rpc": {
        "bind": "127.0.0.1:0", "allow_plaintext": True, "auth_tokens": [TOKEN_DIGEST]}})


@pytest.fixture
def gateway(gateway_settings: Settings, committed_db: sessionmaker[Session]
            ) -> Iterator[GatewayThread]:
    thread = GatewayThread(gateway_settings, committed_db)
    thread.start()
    assert thread.started.wait(20)
    assert thread.failed is None
    yield thread
    thread.stop()
