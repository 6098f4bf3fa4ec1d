"""Lists cost a fixed number of SQL statements, whatever the page size (no N+1)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from flask.testing import FlaskClient
from sqlalchemy import Engine, event

from circus.common.enums import BuildStatus
from tests.api.conftest import World


@contextmanager
def counting(engine: Engine) -> Iterator[list[str]]:
    statements: list[str] = []

    def count(conn: object, cursor: object, statement: str, *args: object) -> None:
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    try:
        yield statements
    finally:
        event.remove(engine, "before_cursor_execute", count)


def test_lists_do_not_query_per_row(client: FlaskClient, admin: dict[str, str], world: World,
                                    engine: Engine) -> None:
    jobset = world.jobset(world.project())
    evaluations = [world.evaluation(jobset) for _ in range(3)]
    for evaluation in evaluations:
        world.build(evaluation, "a", BuildStatus.succeeded, outputs={"out": "/nix/store/x-a"})
    world.db.commit()

    def cost(path: str) -> int:
        with counting(engine) as statements:
            assert client.get(path, headers=admin).status_code == 200
        return len(statements)

    paths = ("/api/v1/builds", "/api/v1/evaluations", "/api/v1/projects/proj/builds")
    for round_, path in enumerate(paths):
        small = cost(path + "?limit=1")
        for evaluation in evaluations:
            for job in ("b", "c", "d", "e"):
                world.build(evaluation, f"{job}{round_}",
                            outputs={"out": f"/nix/store/x-{job}{round_}"})
        world.db.commit()
        assert cost(path + "?limit=100") == small, path
