"""No page issues more SQL statements for a long list than for a short one."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

from sqlalchemy import Engine

from circus.common.enums import BuildStatus, EvaluationStatus, StepState
from circus.common.models import BuilderSession, ServiceHeartbeat
from circus.common.models.base import utcnow
from tests.api.test_query_counts import counting
from tests.dashboard.conftest import Browser
from tests.dashboard.factories import Rows, World

STATUSES = [BuildStatus.succeeded, BuildStatus.failed, BuildStatus.running, BuildStatus.pending,
            BuildStatus.dependency_failed, BuildStatus.cancelled]


def grow(rows: Rows, world: World, n: int, tag: str) -> None:
    """More of everything every page lists: builds with steps, evaluations, jobsets,
    projects, channels, agents, daemons, users, news."""
    for i in range(n):
        status = STATUSES[i % len(STATUSES)]
        build = rows.build(world.evaluation, f"{tag}-{i}", status)
        state = {BuildStatus.running: StepState.running,
                 BuildStatus.pending: StepState.queued}.get(status, StepState.done)
        rows.step(build, state=state, log=f"log {i}\n" if state is StepState.done else None)
        rows.step(world.failed, toplevel=False, status=BuildStatus.succeeded)
        extra = rows.evaluation(world.jobset, EvaluationStatus.completed)
        rows.link(extra, build)
        project = rows.project(f"{tag}-p{i}")
        jobset = rows.jobset(project, "main")
        rows.evaluation(jobset)
        rows.channel(jobset, f"{tag}-c{i}", extra)
        rows.user(f"{tag}-u{i}", password=None)
        rows.db.add(BuilderSession(machine_id=f"{tag}-{i}", name=f"{tag}-agent{i}",
                                   hostname="h", systems=["x86_64-linux"],
                                   supported_features=[], mandatory_features=[],
                                   proto_version=1, connected=i % 2 == 0,
                                   last_seen=utcnow()))
        rows.db.add(ServiceHeartbeat(service=f"queue-runner@{tag}{i}", kind="queue-runner",
                                     hostname=f"{tag}{i}", version="0", details={},
                                     started_at=utcnow() - timedelta(minutes=5),
                                     last_heartbeat=utcnow()))
    rows.db.commit()


def test_pages_issue_a_bounded_number_of_queries(as_admin: Browser, world: World, rows: Rows,
                                                 engine: Engine) -> None:
    pages: list[Callable[[], str]] = [
        lambda: "/", lambda: "/projects", lambda: "/project/demo",
        lambda: "/jobset/demo/main", lambda: "/job/demo/main/tests",
        lambda: f"/eval/{world.evaluation.id}?status=all",
        lambda: f"/eval/{world.evaluation.id}?status=failed",
        lambda: f"/build/{world.failed.id}", lambda: "/queue", lambda: "/machines",
        lambda: "/stats", lambda: "/channels", lambda: "/search?q=g", lambda: "/news",
        lambda: "/admin", lambda: "/admin/users", lambda: "/admin/audit",
        lambda: "/admin/notifications", lambda: "/admin/builders", lambda: "/settings",
    ]

    def cost(path: str) -> int:
        with counting(engine) as statements:
            response = as_admin.get(path)
            assert response.status_code == 200, path
        return len(statements)

    grow(rows, world, 2, "g")
    small = {make(): cost(make()) for make in pages}
    grow(rows, world, 30, "h")
    large = {make(): cost(make()) for make in pages}
    assert large == small
    # and the numbers stay small in absolute terms too
    assert max(large.values()) <= 25, large
