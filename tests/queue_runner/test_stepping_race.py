"""A shared step finishing while a new evaluation is being stepped onto it.

The dispatcher locks the steps it reuses only at the end of its transaction
(so workers finishing them are not held up by its bulk inserts). A step that
finishes before that lock never saw the new builds; the dispatcher must apply
the consequences for them itself. Each test finishes the shared step at exactly
that moment, from another connection, as a worker would.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from circus.common.db import in_transaction
from circus.common.enums import BuildStatus
from circus.queue_runner.dispatch import stepper
from circus.queue_runner.steps.leases import ClaimOptions, claim_steps
from circus.queue_runner.steps.outcomes import StepOutcome, finish_steps
from tests.queue_runner.conftest import Driver
from tests.queue_runner.factories import instantiate, make_builds


def step_id_of(factory: sessionmaker[Session], drv: str) -> tuple[int, str, str]:
    with factory() as session:
        row = session.execute(text("SELECT id, state, queue_class FROM steps "
                                   "WHERE drv_path = :d ORDER BY id DESC LIMIT 1"),
                              {"d": drv}).one()
    return int(row.id), str(row.state), str(row.queue_class)


@pytest.fixture
def finish_during_stepping(monkeypatch: pytest.MonkeyPatch
                           ) -> Iterator[Callable[[Callable[[], None]], None]]:
    """Run a callback right before the dispatcher locks the steps it reuses."""
    callbacks: list[Callable[[], None]] = []
    original = stepper._hold_reused_steps

    def hold(*args: Any, **kwargs: Any) -> None:
        while callbacks:
            callbacks.pop()()
        original(*args, **kwargs)

    monkeypatch.setattr(stepper, "_hold_reused_steps", hold)
    yield callbacks.append
    assert not callbacks, "the dispatcher never reached the lock"


def start_shared_step(run: Driver, factory: sessionmaker[Session], job: str, drv: str
                      ) -> tuple[int, int]:
    """A first evaluation's build of ``drv``, stepped and claimed by worker w1."""
    with factory() as session:
        first = make_builds(session, {job: drv})[job]
    run.step()
    step_id, state, cls = step_id_of(factory, drv)
    assert state == "queued"
    claimed = in_transaction(factory, lambda s: claim_steps(s, "w1", cls, ClaimOptions(),
                                                            lease_secs=60))
    assert [c.id for c in claimed] == [step_id]
    return first.id, step_id


def finisher(run: Driver, step_id: int, status: BuildStatus) -> Callable[[], None]:
    def finish() -> None:
        report = in_transaction(run.factory, lambda s: finish_steps(
            s, run.settings, "w1", [StepOutcome(step_id, status, exit_code=int(
                status is not BuildStatus.succeeded))]))
        assert report.finished == [step_id]
    return finish


def test_a_shared_step_succeeding_meanwhile_still_queues_the_new_dependents(
        driver: Callable[..., Driver], committed_db: sessionmaker[Session],
        nix_env: dict[str, str], nonce: str,
        finish_during_stepping: Callable[[Callable[[], None]], None]) -> None:
    run = driver()
    drvs = instantiate(["base", "left"], nonce, nix_env)
    first, shared = start_shared_step(run, committed_db, "base", drvs["base"])
    finish = finisher(run, shared, BuildStatus.succeeded)

    def build_and_finish() -> None:
        # the worker really builds it, and reports while the next evaluation is stepped
        subprocess.run(["nix-store", "--realise", drvs["base"]], env=nix_env, check=True,
                       capture_output=True)
        finish()

    finish_during_stepping(build_and_finish)
    with committed_db() as session:
        second = make_builds(session, {"left": drvs["left"]})["left"]
    run.step()

    left, state, _ = step_id_of(committed_db, drvs["left"])
    # the worker's own follow-up could not see the new edge: the dispatcher queued it
    assert state == "queued"
    with committed_db() as session:
        links = session.execute(text("SELECT step_id FROM build_steps WHERE build_id = :b "
                                     "ORDER BY step_id"), {"b": second.id}).scalars().all()
    assert links == sorted([shared, left])
    statuses = run.run([first, second.id])
    assert statuses == {first: BuildStatus.succeeded, second.id: BuildStatus.succeeded}


def test_a_shared_step_failing_meanwhile_fails_the_new_builds(
        driver: Callable[..., Driver], committed_db: sessionmaker[Session],
        nix_env: dict[str, str], nonce: str,
        finish_during_stepping: Callable[[Callable[[], None]], None]) -> None:
    run = driver()
    drvs = instantiate(["fails", "needsFailing"], nonce, nix_env)
    first, shared = start_shared_step(run, committed_db, "fails", drvs["fails"])
    finish_during_stepping(finisher(run, shared, BuildStatus.failed))
    with committed_db() as session:
        second = make_builds(session, {"needs": drvs["needsFailing"]})["needs"]
    run.step()

    dependent, state, _ = step_id_of(committed_db, drvs["needsFailing"])
    assert state == "done"
    # nothing is left pending: the new build is settled by the dispatcher itself
    statuses = run.statuses([first, second.id])
    assert statuses == {first: BuildStatus.failed,
                        second.id: BuildStatus.dependency_failed}
    with committed_db() as session:
        origin = session.execute(text(
            "SELECT propagated_from_step_id FROM build_steps WHERE step_id = :s"),
            {"s": dependent}).scalar_one()
    assert origin == shared
