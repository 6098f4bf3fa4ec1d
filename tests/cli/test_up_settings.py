"""What ``circus up`` makes of the user's config before it starts anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from circus.cli.up import Instance


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
