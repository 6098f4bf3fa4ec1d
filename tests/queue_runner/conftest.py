"""Fixtures of the queue-runner tests."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from circus.common.config import Settings
from circus.common.db import in_transaction
from circus.common.enums import BuildStatus
from circus.queue_runner.derivations import DrvCache
from circus.queue_runner.dispatch.stepper import step_builds
from circus.queue_runner.local.worker import LocalBuilder
from circus.queue_runner.routing.capabilities import local_capabilities

#: psi_threshold 100: every test agent reports this one machine's CPU pressure, which
#: other tests (and other test runs) push above the default 80 %; work must not wait on it
TEST_RUNNER = {"lease_secs": 5, "retry_backoff_secs": 0, "unsupported_timeout": 2,
               "poll_interval": 1, "republish_secs": 2, "local_features": [],
               "psi_threshold": 100}


@pytest.fixture
def qr_settings(make_settings: Callable[..., Settings]) -> Callable[..., Settings]:
    """Settings with test-friendly queue-runner values; keyword overrides per section."""

    def make(**overrides: Any) -> Settings:
        runner = {**TEST_RUNNER, **overrides.pop("queue_runner", {})}
        return make_settings(queue_runner=runner, **overrides)

    return make


@pytest.fixture
def runner_config(tmp_path: Path, database_url: str, redis_url: str
                  ) -> Callable[..., dict[str, Any]]:
    """The config of a daemon under test (as a dict; ``daemons.flatten`` makes env vars)."""

    def make(**overrides: Any) -> dict[str, Any]:
        config: dict[str, Any] = {
            "database": {"url": database_url},
            "broker": {"url": redis_url},
            "nix": {"substituters": []},
            "logs": {"log_dir": str(tmp_path / "logs")},
            "gc": {"gc_roots_dir": str(tmp_path / "gcroots")},
            # where a server roots the .drv files evaluators upload (never /var/lib)
            "evaluator": {"work_dir": str(tmp_path / "evaluator")},
            # where the daemon publishes what it built: the default, /var/lib/circus/cache,
            # filled up with every run's NARs
            "cache": {"cache_dir": str(tmp_path / "cache")},
            "queue_runner": dict(TEST_RUNNER),
        }
        for section, values in overrides.items():
            config.setdefault(section, {}).update(values)
        return config

    return make


@pytest.fixture
def settings_of(make_settings: Callable[..., Settings]) -> Callable[[dict[str, Any]], Settings]:
    def make(config: dict[str, Any]) -> Settings:
        return make_settings(**{k: v for k, v in config.items()
                                if k not in ("database", "broker")})

    return make


class Driver:
    """Runs dispatcher and local worker in this process, without Celery (fast, exact)."""

    def __init__(self, settings: Settings, factory: sessionmaker[Session]) -> None:
        self.settings = settings
        self.factory = factory
        self.cache = DrvCache()
        self.builder = LocalBuilder(settings, factory, local_capabilities(settings),
                                    cache=self.cache, name="local:test")

    def step(self) -> None:
        while in_transaction(self.factory,
                             lambda s: step_builds(s, self.settings, self.cache)).builds:
            pass

    def queued_classes(self) -> list[str]:
        with self.factory() as session:
            return list(session.execute(text(
                "SELECT DISTINCT queue_class FROM steps WHERE state = 'queued'")).scalars())

    def run(self, build_ids: list[int], timeout: float = 60.0) -> dict[int, BuildStatus]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.step()
            served = 0
            for cls in self.queued_classes():
                if self.builder.capabilities.can_serve(cls):
                    served += self.builder.serve(cls)
            statuses = self.statuses(build_ids)
            if all(s.is_finished for s in statuses.values()):
                return statuses
            if not served:
                time.sleep(0.1)
        raise TimeoutError(f"builds not finished: {self.statuses(build_ids)}")

    def statuses(self, build_ids: list[int]) -> dict[int, BuildStatus]:
        with self.factory() as session:
            rows = session.execute(text("SELECT id, status FROM builds WHERE id = ANY(:ids)"),
                                   {"ids": build_ids}).all()
        return {row.id: BuildStatus(row.status) for row in rows}


@pytest.fixture
def driver(qr_settings: Callable[..., Settings], committed_db: sessionmaker[Session],
           nix_env: dict[str, str]) -> Callable[..., Driver]:
    def make(**overrides: Any) -> Driver:
        return Driver(qr_settings(**overrides), committed_db)

    return make
