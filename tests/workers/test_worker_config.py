"""The remote worker's config file: every problem listed, secrets from files."""

from __future__ import annotations

from pathlib import Path

import pytest

from celeryconfig import common_celery_settings
from circus.common.configbase import ConfigError
from circus.worker.config import load_worker_settings
from circus.worker.main import RemoteWorkerDaemon, main


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


def test_a_bad_config_exits_2_with_every_problem(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "worker.toml"
    config.write_text('[worker]\nserver_url = "ftp://s"\nbroker_url = "redis://b"\n')
    with pytest.raises(SystemExit) as exited:
        main(["--config", str(config), "--log-level", "debug"])
    assert exited.value.code == 2
    problems = capsys.readouterr().err
    for key in ("worker.server_url", "worker.token"):
        assert key in problems, problems


@pytest.mark.parametrize(("broker_url", "transport_options"), [
    ("amqp://broker.example.org//", {}),
    ("redis://broker.example.org/0", {"visibility_timeout": 6 * 3600})])
def test_the_workers_celery_app_has_the_daemons_broker_settings(
        tmp_path: Path, broker_url: str, transport_options: dict[str, int]) -> None:
    config = tmp_path / "worker.toml"
    config.write_text(f'[worker]\nserver_url = "http://s"\ntoken = "t"\n'
                      f'broker_url = "{broker_url}"\n')
    conf = RemoteWorkerDaemon(load_worker_settings([config], environ={})).app.conf
    # visibility_timeout is Redis' own; the rest as every daemon has it
    assert conf.broker_transport_options == transport_options
    for key, value in common_celery_settings(broker_url).items():
        assert conf[key] == value, key
