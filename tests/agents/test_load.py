"""Load: 200 builds across three agents, each with its own Nix store; none lost, none
built twice, every agent used.

(Apart from tests/agents/test_integration.py, the suite's longest test in a file of its
own, so that the two can run on two pytest workers at once.)"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from circus.common.enums import BuildStatus
from tests.agents.test_integration import (
    JOBS,
    connected,
    gateway_runner,  # noqa: F401  (fixture)
    start_agent,
    wait_builds,
)
from tests.helpers.daemons import wait_until
from tests.queue_runner.factories import instantiate, make_builds

pytestmark = pytest.mark.slow


def test_load_200_builds_across_three_agents(
        gateway_runner: Callable[..., Any],  # noqa: F811  (the imported fixture)
        committed_db: sessionmaker[Session], nix_env: dict[str, str], nonce: str,
        tmp_path: Path) -> None:
    count = 200
    drvs = instantiate([f"many.n{i}" for i in range(count)], nonce, nix_env, expr=JOBS,
                       args={"count": count})
    with gateway_runner() as (runner, port), ExitStack() as stack:
        for name in ("a1", "a2", "a3"):
            start_agent(stack, tmp_path, port, name, max_jobs=2)
        wait_until(lambda: len(connected(committed_db)) == 3, timeout=30,
                   message="three agents connected")
        with committed_db() as session:
            builds = make_builds(session, drvs)
        ids = [b.id for b in builds.values()]
        result = wait_builds(committed_db, ids, timeout=240)
        print(runner.log()[-2000:])
    assert set(result.values()) == {BuildStatus.succeeded}
    with committed_db() as session:
        steps = session.execute(text(
            "SELECT drv_path, count(*) AS n, bool_and(state = 'done' AND status = 2) AS ok "
            "FROM steps WHERE drv_path = ANY(:d) GROUP BY drv_path"),
            {"d": list(drvs.values())}).all()
        per_agent = dict(session.execute(text(
            "SELECT machine, count(*) FROM steps WHERE drv_path = ANY(:d) GROUP BY machine"),
            {"d": list(drvs.values())}).all())
        unfinished = session.execute(text(
            "SELECT count(*) FROM builds WHERE id = ANY(:ids) AND completed_at IS NULL"),
            {"ids": ids}).scalar_one()
    # none lost, none built twice: one finished step per derivation
    assert len(steps) == count
    assert all(s.n == 1 and s.ok for s in steps)
    assert unfinished == 0
    assert set(per_agent) == {"a1", "a2", "a3"}
    assert sum(per_agent.values()) == count
