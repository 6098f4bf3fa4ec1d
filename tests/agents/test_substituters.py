"""The substituters an agent's Nix calls use: none unless configured (issue 15:
an offline agent spent seconds per step retrying cache.nixos.org)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from circus.agent.config import load_agent_settings
from circus.agent.daemon import Agent


def agent_from(tmp_path: Path, extra: str = "") -> Agent:
    path = tmp_path / "agent.toml"
    path.write_text(f"""
[agent]
runner_url = "tcp://127.0.0.1:7000"
auth_token = "t"
work_dir = "{tmp_path / 'work'}"
{extra}
""")
    return Agent(load_agent_settings(files=[path], environ={}).agent)


def substituters_seen_by_nix(env: dict[str, str]) -> list[str]:
    """What a real Nix process started with the agent's environment uses."""
    done = subprocess.run(
        ["nix", "--extra-experimental-features", "nix-command", "show-config"],
        capture_output=True, text=True, env=env, check=True)
    for line in done.stdout.splitlines():
        key, _, value = line.partition(" = ")
        if key == "substituters":
            return value.split()
    raise AssertionError("nix show-config printed no substituters")


def test_an_agent_substitutes_from_nowhere_by_default(tmp_path: Path) -> None:
    # the host's nix.conf would say cache.nixos.org
    host = subprocess.run(["nix", "--extra-experimental-features", "nix-command",
                           "show-config"], capture_output=True, text=True, check=True).stdout
    assert "substituters = https://cache.nixos.org" in host
    agent = agent_from(tmp_path)
    assert substituters_seen_by_nix(agent.environment.nix_env) == []


def test_configured_substituters_reach_the_agents_nix(tmp_path: Path) -> None:
    agent = agent_from(tmp_path, 'substituters = ["http://ci.example.org:3000/nix-cache"]\n'
                                 'trusted_public_keys = ["ci-1:' + "A" * 43 + '="]')
    assert substituters_seen_by_nix(agent.environment.nix_env) == [
        "http://ci.example.org:3000/nix-cache"]
