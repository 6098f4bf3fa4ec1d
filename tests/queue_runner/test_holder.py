"""The step holder every kind of builder uses: lease renewal, hand-back, no double finish.

Real PostgreSQL, no Nix: the steps are rows, the "build" is the test.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Mapping

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session, sessionmaker

from circus.common.config import Settings
from circus.common.db import in_transaction
from circus.common.enums import BuildStatus
from circus.queue_runner.steps.holder import LeaseKeeper, Renewal, StepHolder
from circus.queue_runner.steps.leases import ClaimOptions, expire_leases
from circus.queue_runner.steps.outcomes import FinishReport, StepOutcome
from tests.helpers.daemons import wait_until
from tests.queue_runner.test_claims import CLS, add_step, state_of


class Recorder:
    """What a holder published and reported after commit."""

    def __init__(self) -> None:
        self.published: Counter[str] = Counter()
        self.built: list[FinishReport] = []

    def publish(self, counts: Mapping[str, int]) -> None:
        self.published.update(counts)


def make_holder(settings: Settings, factory: sessionmaker[Session], worker: str,
                recorder: Recorder) -> StepHolder:
    return StepHolder(settings, factory, worker, publish=recorder.publish,
                      on_built=recorder.built.append)


def claim(holder: StepHolder, factory: sessionmaker[Session], limit: int = 10) -> list[int]:
    options = ClaimOptions(limit=limit, lookahead=False)
    claimed = in_transaction(factory, lambda s: holder.claim(s, CLS, options))
    return [step.id for step in claimed]


def lease_until(factory: sessionmaker[Session], step_id: int) -> object:
    with factory() as session:
        return session.execute(text("SELECT lease_until FROM steps WHERE id = :id"),
                               {"id": step_id}).scalar_one()


def test_the_lease_is_renewed_while_the_step_runs(
        qr_settings: Callable[..., Settings], committed_db: sessionmaker[Session]) -> None:
    settings = qr_settings(queue_runner={"lease_secs": 3})
    with committed_db() as s:
        step = add_step(s, "h1")
        s.commit()
    holder = make_holder(settings, committed_db, "w1", Recorder())
    assert claim(holder, committed_db) == [step]
    assert holder.held == {step}
    assert holder.renew_every == 1.0
    first = lease_until(committed_db, step)
    lost: list[Renewal] = []
    keeper = LeaseKeeper(holder, lost.append)
    keeper.start()
    try:
        wait_until(lambda: lease_until(committed_db, step) != first, timeout=10,
                   message="lease renewed by the keeper")
    finally:
        keeper.stop()
        keeper.join(5)
    assert lease_until(committed_db, step) > first  # type: ignore[operator]
    assert not lost
    assert not keeper.lost.is_set()
    with committed_db() as s:
        assert state_of(s, step) == ("running", None, "w1")


def test_steps_go_back_to_the_queue_when_the_build_raises(
        qr_settings: Callable[..., Settings], committed_db: sessionmaker[Session]) -> None:
    with committed_db() as s:
        steps = [add_step(s, "h2"), add_step(s, "h3")]
        s.commit()
    recorder = Recorder()
    holder = make_holder(qr_settings(), committed_db, "w1", recorder)
    assert sorted(claim(holder, committed_db)) == steps
    with pytest.raises(RuntimeError), holder.releasing():
        raise RuntimeError("the build broke")
    assert holder.held == frozenset()
    with committed_db() as s:
        for step in steps:
            assert state_of(s, step) == ("queued", None, None)
        attempts = s.execute(text("SELECT sum(attempts) FROM steps")).scalar_one()
    assert attempts == 0  # handed back, no attempt counted
    assert recorder.published == {CLS: 2}  # wake-ups for the steps queued again


def test_a_lost_lease_stops_the_finish(
        qr_settings: Callable[..., Settings], committed_db: sessionmaker[Session]) -> None:
    settings = qr_settings()
    with committed_db() as s:
        noticed, unnoticed = add_step(s, "h4"), add_step(s, "h5")
        s.commit()
    stale = Recorder()
    renewing = make_holder(settings, committed_db, "w1", stale)
    silent = make_holder(settings, committed_db, "w2", stale)
    assert claim(renewing, committed_db, limit=1) == [noticed]
    assert claim(silent, committed_db, limit=1) == [unnoticed]
    # both stall: their leases lapse, the reconciler re-queues, w3 takes both over
    with committed_db() as s:
        s.execute(text("UPDATE steps SET lease_until = now() - interval '1 second'"))
        s.commit()
    report = in_transaction(committed_db, lambda s: expire_leases(s, settings))
    assert sorted(report.requeued) == [noticed, unnoticed]
    fresh = Recorder()
    taker = make_holder(settings, committed_db, "w3", fresh)
    # retried steps are claimed one at a time
    assert claim(taker, committed_db) + claim(taker, committed_db) == [noticed, unnoticed]

    # a holder that renews learns it lost the step and reports nothing
    assert renewing.renew() == Renewal(frozenset({noticed}))
    assert renewing.held == frozenset()
    late = renewing.finish([StepOutcome(noticed, BuildStatus.failed)])
    assert late is not None
    assert late.finished == []
    # one that did not renew tries; the database refuses (the claim is w3's now)
    assert silent.held == {unnoticed}
    late = silent.finish([StepOutcome(unnoticed, BuildStatus.failed)])
    assert late is not None
    assert late.finished == []
    assert silent.held == frozenset()
    assert stale.built == []
    with committed_db() as s:
        assert state_of(s, noticed) == ("running", None, "w3")
        assert state_of(s, unnoticed) == ("running", None, "w3")

    # the holder that has them finishes each exactly once
    done = taker.finish([StepOutcome(noticed, BuildStatus.succeeded),
                         StepOutcome(unnoticed, BuildStatus.succeeded)])
    assert done is not None
    assert sorted(done.finished) == [noticed, unnoticed]
    again = taker.finish([StepOutcome(noticed, BuildStatus.failed)])
    assert again is not None
    assert again.finished == []
    with committed_db() as s:
        for step in (noticed, unnoticed):
            assert state_of(s, step) == ("done", int(BuildStatus.succeeded), "w3")


def test_a_holder_that_cannot_renew_fences_itself(
        qr_settings: Callable[..., Settings], committed_db: sessionmaker[Session]) -> None:
    settings = qr_settings(queue_runner={"lease_secs": 1})
    with committed_db() as s:
        step = add_step(s, "h6")
        s.commit()
    holder = make_holder(settings, committed_db, "w1", Recorder())
    assert claim(holder, committed_db) == [step]
    engine = committed_db.kw["bind"]
    # the database is gone for this holder: every connection fails
    unreachable = create_engine(engine.url.set(database="circus_no_such_database"))
    holder.factory = sessionmaker(bind=unreachable)
    try:
        # within 80 % of the lease a failed renewal is only a warning
        assert holder.renew() == Renewal()
        assert holder.held == {step}
        threading.Event().wait(settings.queue_runner.lease_secs * 0.8)
        assert holder.renew() == Renewal(frozenset({step}), fenced=True)
        assert holder.held == frozenset()
    finally:
        unreachable.dispose()
