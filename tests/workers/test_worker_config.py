"""The remote worker's config file: every problem listed, secrets from files."""

from __future__ import annotations

from pathlib import Path

import pytest

from circus.common.configbase import ConfigError
from circus.worker.config import load_worker_settings


def test_the_token_comes_from_a_file_and_defaults_fill_the_rest(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("s3cret-token\n")
    config = tmp_path / "worker.toml"
    config.write_text(f"""
[worker]
server_url = "https://ci.example.org"
token_file = "{tmp_path / 'token'}"
broker_url = "amqp://broker.example.org//"
features = ["kvm"]
""")
    settings = load_worker_settings([config], environ={})
    assert settings.worker.token == "s3cret-token"
    assert settings.worker.slots == 1
    assert settings.nix.sandbox is True


def test_every_problem_is_listed(tmp_path: Path) -> None:
    config = tmp_path / "worker.toml"
    config.write_text("""
[worker]
server_url = "ftp://ci.example.org"
broker_url = "redis://localhost"
[nix]
sandbox_paths = ["relative/path"]
""")
    with pytest.raises(ConfigError) as raised:
        load_worker_settings([config], environ={})
    rendered = raised.value.render()
    for key in ("worker.server_url", "worker.token", "nix.sandbox_paths.0"):
        assert key in rendered, rendered


def test_a_worker_needs_a_slot(tmp_path: Path) -> None:
    config = tmp_path / "worker.toml"
    config.write_text('[worker]\nserver_url = "http://s"\ntoken = "t"\nbroker_url = "redis://b"\n'
                      "slots = 0\n")
    with pytest.raises(ConfigError, match=r"worker.slots: must be at least 1 \(got 0\)"):
        load_worker_settings([config], environ={})
