"""circus-queue-runner as a real process: Celery routing, LISTEN, statuses, actions."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from circus.common.enums import BuildStatus
from tests.helpers.daemons import wait_until
from tests.queue_runner.daemons import runner_daemon
from tests.queue_runner.factories import instantiate, make_builds


def statuses(factory: sessionmaker[Session], ids: list[int]) -> dict[int, BuildStatus]:
    with factory() as session:
        rows = session.execute(text("SELECT id, status FROM builds WHERE id = ANY(:ids)"),
                               {"ids": ids}).all()
    return {r.id: BuildStatus(r.status) for r in rows}


def wait_finished(factory: sessionmaker[Session], ids: list[int], timeout: float = 60
                  ) -> dict[int, BuildStatus]:
    wait_until(lambda: all(s.is_finished for s in statuses(factory, ids).values()),
               timeout=timeout, message="builds finished")
    return statuses(factory, ids)


def test_daemon_builds_every_status(runner_config: Callable[..., dict[str, Any]],
                                    committed_db: sessionmaker[Session],
                                    nix_env: dict[str, str], nonce: str, tmp_path: Path) -> None:
    config = runner_config(queue_runner={"max_log_size": 20000, "workers": 2})
    jobs = ["top", "fails", "needsFailing", "withOutput", "chatty", "needsFeature", "products"]
    drvs = instantiate(jobs, nonce, nix_env)
    with runner_daemon("qr1", config, tmp_path) as daemon:
        time.sleep(2)
        with committed_db() as session:
            builds = make_builds(session, drvs)
        ids = {job: b.id for job, b in builds.items()}
        try:
            result = wait_finished(committed_db, list(ids.values()))
        finally:
            print(daemon.log()[-5000:])
    assert result[ids["top"]] is BuildStatus.succeeded
    assert result[ids["fails"]] is BuildStatus.failed
    assert result[ids["needsFailing"]] is BuildStatus.dependency_failed
    assert result[ids["withOutput"]] is BuildStatus.failed_with_output
    assert result[ids["chatty"]] is BuildStatus.log_limit_exceeded
    assert result[ids["needsFeature"]] is BuildStatus.unsupported_system
    assert result[ids["products"]] is BuildStatus.succeeded
