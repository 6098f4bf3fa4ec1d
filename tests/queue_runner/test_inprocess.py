"""Steps and statuses with real Nix and PostgreSQL, dispatcher and worker in-process."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from circus.common.enums import BuildStatus
from tests.queue_runner.conftest import Driver
from tests.queue_runner.factories import instantiate, make_builds


def test_dag_statuses(driver: Callable[..., Driver], committed_db: sessionmaker[Session],
                      nix_env: dict[str, str], nonce: str) -> None:
    run = driver()
    drvs = instantiate(["top", "left", "fails", "needsFailing", "withOutput"], nonce, nix_env)
    with committed_db() as session:
        builds = make_builds(session, drvs)
    ids = {job: b.id for job, b in builds.items()}
    statuses = run.run(list(ids.values()))
    assert statuses[ids["top"]] is BuildStatus.succeeded
    assert statuses[ids["left"]] is BuildStatus.succeeded
    assert statuses[ids["fails"]] is BuildStatus.failed
    assert statuses[ids["needsFailing"]] is BuildStatus.dependency_failed
    assert statuses[ids["withOutput"]] is BuildStatus.failed_with_output
    with committed_db() as session:
        steps = session.execute(text("SELECT drv_path, count(*) FROM steps GROUP BY drv_path"
                                     )).all()
        assert all(n == 1 for _, n in steps)

