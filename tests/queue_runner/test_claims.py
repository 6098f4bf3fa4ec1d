"""Claim order, conditional finishing, leases and release — on real PostgreSQL, no Nix."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from circus.common.config import Settings
from circus.common.db import in_transaction
from circus.common.enums import BuildStatus
from circus.queue_runner.local.worker import LocalBuilder
from circus.queue_runner.routing.capabilities import local_capabilities
from circus.queue_runner.steps import leases
from circus.queue_runner.steps.holder import StepHolder
from circus.queue_runner.steps.leases import (
    ClaimOptions,
    claim_steps,
    expire_leases,
    release_steps,
    renew_lease,
)
from circus.queue_runner.steps.outcomes import StepOutcome, finish_steps
from circus.queue_runner.steps.reconciler import reconcile
from tests.queue_runner.factories import make_jobset

CLS = "x86_64-linux"


def add_step(session: Session, drv: str, *, state: str = "queued", priority: int = 0,
             jobset_id: int | None = None, deps: list[int] | None = None, cls: str = CLS,
             dependents: int = 0, timeout: int | None = None) -> int:
    step_id = session.execute(text("""
        INSERT INTO steps (drv_path, system, queue_class, state, priority, jobset_id, dependents,
                           timeout, queued_at, published_at)
        VALUES (:drv, 'x86_64-linux', :cls, :state, :p, :j, :n, :t, now(), now())
        RETURNING id
    """), {"drv": f"/nix/store/{drv:0>32}-x.drv", "cls": cls, "state": state, "p": priority,
           "j": jobset_id, "n": dependents, "t": timeout}).scalar_one()
    for dep in deps or []:
        session.execute(text("INSERT INTO step_dependencies VALUES (:s, :d)"),
                        {"s": step_id, "d": dep})
    return int(step_id)


def state_of(session: Session, step_id: int) -> tuple[str, int | None, str | None]:
    row = session.execute(text("SELECT state, status, worker FROM steps WHERE id = :id"),
                          {"id": step_id}).one()
    return row.state, row.status, row.worker


def claim(session: Session, worker: str, limit: int = 10, **kw: Any) -> list[int]:
    options = ClaimOptions(limit=limit, **kw)
    return [c.id for c in claim_steps(session, worker, CLS, options, lease_secs=60)]


def test_priority_then_fair_share_then_age(committed_db: sessionmaker[Session]) -> None:
    with committed_db() as s:
        busy = make_jobset(s, "busy", shares=100).id
        idle = make_jobset(s, "idle", shares=100).id
        # the busy jobset already has two steps running
        add_step(s, "r1", state="running", jobset_id=busy)
        add_step(s, "r2", state="running", jobset_id=busy)
        old_busy = add_step(s, "a1", jobset_id=busy)
        new_idle = add_step(s, "a2", jobset_id=idle)
        bumped = add_step(s, "a3", jobset_id=busy, priority=5)
        s.commit()
        assert claim(s, "w1", limit=1) == [bumped]
        assert claim(s, "w1", limit=1) == [new_idle]
        assert claim(s, "w1", limit=1) == [old_busy]
        s.commit()


def test_a_claim_past_every_locked_head_takes_the_next_step(
        committed_db: sessionmaker[Session]) -> None:
    """A claim orders the head of each jobset's queue (``HEAD_PER_JOBSET`` steps);
    when other claims hold all of them, it still finds the next queued step."""
    from circus.queue_runner.steps.leases import HEAD_PER_JOBSET

    with committed_db() as s:
        jobset = make_jobset(s, "deep").id
        ids = [add_step(s, f"d{i}", jobset_id=jobset) for i in range(HEAD_PER_JOBSET + 2)]
        s.commit()
    with committed_db() as other, committed_db() as s:
        # another claim in flight holds every head of the jobset
        locked = other.execute(text(
            "SELECT id FROM steps WHERE id = ANY(:ids) ORDER BY id LIMIT :n FOR UPDATE"),
            {"ids": ids, "n": HEAD_PER_JOBSET}).scalars().all()
        assert locked == ids[:HEAD_PER_JOBSET]
        assert claim(s, "w1", limit=1) == [ids[HEAD_PER_JOBSET]]
        assert claim(s, "w1", limit=1) == [ids[HEAD_PER_JOBSET + 1]]
        assert claim(s, "w1", limit=1) == []
        s.commit()
        other.rollback()


def test_steps_of_no_jobset_are_claimed_in_order(committed_db: sessionmaker[Session]) -> None:
    with committed_db() as s:
        jobset = make_jobset(s, "some").id
        low = add_step(s, "low", jobset_id=jobset, priority=-1)
        orphan = add_step(s, "nojobset")
        s.commit()
        assert claim(s, "w1", limit=1) == [orphan]
        assert claim(s, "w1", limit=1) == [low]
        s.commit()


def test_shares_weigh_running_steps(committed_db: sessionmaker[Session]) -> None:
    with committed_db() as s:
        big = make_jobset(s, "big", shares=1000).id
        small = make_jobset(s, "small", shares=10).id
        add_step(s, "r1", state="running", jobset_id=big)
        add_step(s, "r2", state="running", jobset_id=small)
        first = add_step(s, "b1", jobset_id=small)
        second = add_step(s, "b2", jobset_id=big)
        s.commit()
        # 1/1000 running per share beats 1/10: the big jobset goes first despite its age
        assert claim(s, "w", limit=1) == [second]
        assert claim(s, "w", limit=1) == [first]


def test_critical_path_order_is_optional(committed_db: sessionmaker[Session]) -> None:
    with committed_db() as s:
        few = add_step(s, "c1", dependents=1)
        many = add_step(s, "c2", dependents=9)
        s.commit()
        assert claim(s, "w", limit=1, critical_path=True) == [many]
        assert claim(s, "w", limit=1, critical_path=True) == [few]


def test_claims_never_overlap_and_respect_timeouts(committed_db: sessionmaker[Session]) -> None:
    with committed_db() as s:
        plain = [add_step(s, f"p{i}") for i in range(3)]
        odd = add_step(s, "t1", timeout=5)
        s.commit()
        with committed_db() as other:
            mine = claim(s, "w1", limit=2)
            theirs = claim(other, "w2", limit=5)  # while w1's claim is uncommitted
            other.commit()
        s.commit()
        assert len(mine) == 2
        assert not set(mine) & set(theirs)
        # one batch shares its timeouts: the odd one is claimed alone
        assert set(mine) | set(theirs) == set(plain)
        assert claim(s, "w3") == [odd]


def test_lookahead_claims_chains_held_by_the_same_worker(committed_db: sessionmaker[Session]
                                                         ) -> None:
    with committed_db() as s:
        a = add_step(s, "l1")
        b = add_step(s, "l2", state="pending", deps=[a])
        c = add_step(s, "l3", state="pending", deps=[b])
        other = add_step(s, "l4", state="running")
        blocked = add_step(s, "l5", state="pending", deps=[b, other])
        s.commit()
        got = claim(s, "w", limit=10)
        assert got == [a, b, c]
        assert state_of(s, blocked)[0] == "pending"
        # finishing the chain's head queues nothing inside the claim, and the blocked one
        # still waits for the step someone else is building
        report = finish_steps(s, Settings(), "w", [StepOutcome(a, BuildStatus.succeeded)])
        assert sum(report.queued.values()) == 0
        s.commit()


def test_batch_limit_caps_the_lookahead(committed_db: sessionmaker[Session]) -> None:
    with committed_db() as s:
        head = add_step(s, "k1")
        second = add_step(s, "k2", state="pending", deps=[head])
        third = add_step(s, "k3", state="pending", deps=[second])
        fourth = add_step(s, "k4", state="pending", deps=[third])
        s.commit()
        assert claim(s, "w", limit=1, batch_limit=3) == [head, second, third]
        assert state_of(s, fourth)[0] == "pending"
        s.commit()


def _diamond_and_chain(s: Session, prefix: str) -> dict[str, int]:
    """head → left, right → both (a diamond), head → c1 → c2 → c3 (a chain)."""
    head = add_step(s, f"{prefix}0")
    left = add_step(s, f"{prefix}1", state="pending", deps=[head], priority=1)
    right = add_step(s, f"{prefix}2", state="pending", deps=[head])
    both = add_step(s, f"{prefix}3", state="pending", deps=[left, right])
    c1 = add_step(s, f"{prefix}4", state="pending", deps=[head])
    c2 = add_step(s, f"{prefix}5", state="pending", deps=[c1])
    c3 = add_step(s, f"{prefix}6", state="pending", deps=[c2])
    return {"head": head, "left": left, "right": right, "both": both, "c1": c1, "c2": c2,
            "c3": c3}


def test_lookahead_takes_waves_by_priority_and_reads_wide_graphs_wave_by_wave(
        committed_db: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch) -> None:
    # two heads: a wave takes at most two steps. Wave 1, by priority then id: left
    # (priority 1) and right; c1 and the other head's dependent are left to other
    # slots. Wave 2: both (the diamond waited for both sides); nothing depends on it
    with committed_db() as s:
        one = _diamond_and_chain(s, "wa")
        other = add_step(s, "wa9")
        after_other = add_step(s, "wa10", state="pending", deps=[other])
        s.commit()
        expected = [one["head"], other, one["left"], one["right"], one["both"]]
        assert claim(s, "w", limit=2, batch_limit=6) == expected
        assert state_of(s, after_other) == ("pending", None, None)
        assert state_of(s, one["c1"]) == ("pending", None, None)
        s.rollback()
        # a graph wider than the single read takes: the same claim, a statement per wave
        monkeypatch.setattr(leases, "LOOKAHEAD_READ_CAP", 2)
        assert claim(s, "w", limit=2, batch_limit=7) == expected
        s.rollback()


def test_lookahead_follows_chains_and_leaves_fan_outs_to_other_slots(
        committed_db: sessionmaker[Session]) -> None:
    with committed_db() as s:
        head = add_step(s, "fo0")
        fan = [add_step(s, f"fo{i}", state="pending", deps=[head]) for i in range(1, 4)]
        s.commit()
        assert claim(s, "w", limit=1, batch_limit=10) == [head, fan[0]]
        s.rollback()


def test_lookahead_leaves_steps_another_transaction_holds_and_their_dependents(
        committed_db: sessionmaker[Session]) -> None:
    with committed_db() as s, committed_db() as other:
        head = add_step(s, "wl0")
        chain = [add_step(s, "wl1", state="pending", deps=[head])]
        for i in (2, 3):
            chain.append(add_step(s, f"wl{i}", state="pending", deps=[chain[-1]]))
        s.commit()
        # e.g. a finishing transaction queuing it: locked, so skipped
        other.execute(text("SELECT id FROM steps WHERE id = :id FOR UPDATE"),
                      {"id": chain[1]})
        assert claim(s, "w", limit=1, batch_limit=10) == [head, chain[0]]
        # the third waited for the second: not claimed, and left as it was
        for step in chain[1:]:
            assert state_of(s, step) == ("pending", None, None)
        assert s.execute(text(
            "SELECT count(*) FROM steps WHERE id = ANY(:ids) AND (machine IS NOT NULL "
            "OR lease_until IS NOT NULL OR started_at IS NOT NULL)"),
            {"ids": chain[1:]}).scalar_one() == 0
        s.commit()
        other.rollback()


def test_finishing_is_conditional_on_holding_the_step(committed_db: sessionmaker[Session],
                                                      settings: Settings) -> None:
    with committed_db() as s:
        step = add_step(s, "f1")
        s.commit()
        assert claim(s, "w1") == [step]
        s.commit()
        stolen = finish_steps(s, settings, "w2", [StepOutcome(step, BuildStatus.failed)])
        assert stolen.finished == []
        done = finish_steps(s, settings, "w1", [StepOutcome(step, BuildStatus.succeeded)])
        again = finish_steps(s, settings, "w1", [StepOutcome(step, BuildStatus.failed)])
        s.commit()
        assert done.finished == [step]
        assert again.finished == []
        assert state_of(s, step) == ("done", int(BuildStatus.succeeded), "w1")


def test_success_queues_dependents_and_failure_propagates(committed_db: sessionmaker[Session],
                                                          settings: Settings) -> None:
    with committed_db() as s:
        a = add_step(s, "d1")
        b = add_step(s, "d2")
        both = add_step(s, "d3", state="pending", deps=[a, b])
        only_a = add_step(s, "d4", state="pending", deps=[a])
        after = add_step(s, "d5", state="pending", deps=[only_a])
        s.commit()
        claim(s, "w", lookahead=False)
        s.commit()
        report = finish_steps(s, settings, "w", [StepOutcome(a, BuildStatus.succeeded)])
        assert report.queued[CLS] == 1
        assert state_of(s, only_a)[0] == "queued"
        assert state_of(s, both)[0] == "pending"
        finish_steps(s, settings, "w", [StepOutcome(b, BuildStatus.timeout)])
        assert state_of(s, both)[:2] == ("done", int(BuildStatus.dependency_failed))
        assert state_of(s, after)[0] == "pending"
        s.commit()


def test_aborted_steps_retry_until_attempts_run_out(committed_db: sessionmaker[Session],
                                                    make_settings: Callable[..., Settings]
                                                    ) -> None:
    settings = make_settings(queue_runner={"max_retries": 1, "retry_backoff_secs": 0})
    with committed_db() as s:
        step = add_step(s, "x1")
        s.commit()
        for expected in ("queued", "done"):
            assert claim(s, "w") == [step]
            finish_steps(s, settings, "w", [StepOutcome(step, BuildStatus.aborted,
                                                        error_message="infra", retry=True)])
            s.commit()
            assert state_of(s, step)[0] == expected
        assert state_of(s, step)[1] == int(BuildStatus.aborted)


def test_release_and_expiry(committed_db: sessionmaker[Session],
                            make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(queue_runner={"max_retries": 1})
    with committed_db() as s:
        head = add_step(s, "e1")
        tail = add_step(s, "e2", state="pending", deps=[head])
        s.commit()
        assert claim(s, "w") == [head, tail]
        queued = release_steps(s, "w", [head, tail])
        s.commit()
        assert queued[CLS] == 1
        assert state_of(s, head) == ("queued", None, None)
        assert state_of(s, tail) == ("pending", None, None)
        assert claim(s, "w2") == [head, tail]
        assert renew_lease(s, "w2", [head, tail], 60) == {head, tail}
        assert renew_lease(s, "w1", [head], 60) == set()
        s.execute(text("UPDATE steps SET lease_until = now() - interval '1 second'"))
        s.commit()
        report = expire_leases(s, settings)
        s.commit()
        assert sorted(report.requeued) == [head, tail]
        assert state_of(s, head)[0] == "queued"
        # a retried step is built alone (it may be what broke the batch)
        assert claim(s, "w3") == [head]
        s.execute(text("UPDATE steps SET lease_until = now() - interval '1 second'"))
        s.commit()
        expire_leases(s, settings)
        s.commit()
        # the second lapse exceeds max_retries: aborted, and the dependent fails with it
        assert state_of(s, head)[:2] == ("done", int(BuildStatus.aborted))
        assert state_of(s, tail)[:2] == ("done", int(BuildStatus.dependency_failed))


def test_reconciler_republishes_and_repairs(committed_db: sessionmaker[Session],
                                            make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(queue_runner={"republish_secs": 1})
    with committed_db() as s:
        done = add_step(s, "g1", state="running")
        s.execute(text("UPDATE steps SET state = 'done', status = 2 WHERE id = :id"), {"id": done})
        stuck = add_step(s, "g2", state="pending", deps=[done])
        stale = add_step(s, "g3")
        s.execute(text("UPDATE steps SET published_at = now() - interval '1 minute' "
                       "WHERE id = :id"), {"id": stale})
        s.commit()
        report = reconcile(s, settings)
        s.commit()
        assert report.ran
        assert report.repaired == 1
        assert state_of(s, stuck)[0] == "queued"
        assert report.republished[CLS] == 1
        assert report.to_publish[CLS] == 2


def test_a_slot_leaves_chain_heads_to_the_other_slots(committed_db: sessionmaker[Session],
                                                      settings: Settings) -> None:
    # three chains ready, two slots: Nix builds a batch one derivation at a time, so a
    # slot taking two heads (and their chains) builds them in turn while the other
    # slot, with the third chain, runs dry
    with committed_db() as s:
        heads = [add_step(s, f"h{i}") for i in range(3)]
        links = {head: add_step(s, f"n{i}", state="pending", deps=[head])
                 for i, head in enumerate(heads)}
        s.commit()
    builder = LocalBuilder(settings, committed_db, local_capabilities(settings), slots=2)
    first = in_transaction(committed_db, lambda s: builder.claim_batch(
        s, StepHolder(settings, committed_db, "slot-1"), CLS))
    second = in_transaction(committed_db, lambda s: builder.claim_batch(
        s, StepHolder(settings, committed_db, "slot-2"), CLS))
    assert [c.id for c in first] == [heads[0], links[heads[0]]]
    assert [c.id for c in second] == [heads[1], links[heads[1]]]


def test_a_slot_leaves_chain_heads_to_a_slot_that_is_building(
        committed_db: sessionmaker[Session], settings: Settings) -> None:
    # the tail of a DAG: two chains left, the other slot still building its batch. Taking
    # both heads (and so both chains) would build them in turn while that slot, done a
    # moment later, found nothing left: the idle slot takes one chain
    with committed_db() as s:
        heads = [add_step(s, f"h{i}") for i in range(2)]
        links = {head: add_step(s, f"n{i}", state="pending", deps=[head])
                 for i, head in enumerate(heads)}
        # a fan-in's top waits for both heads: it is no chain of either
        add_step(s, "top", state="pending", deps=heads)
        s.commit()
    builder = LocalBuilder(settings, committed_db, local_capabilities(settings), slots=2)
    builder.active["local:other-slot"] = cast(Any, None)
    got = in_transaction(committed_db, lambda s: builder.claim_batch(
        s, StepHolder(settings, committed_db, "slot-1"), CLS))
    assert [c.id for c in got] == [heads[0], links[heads[0]]]


def test_a_slot_takes_many_chain_heads_while_the_other_builds(
        committed_db: sessionmaker[Session], settings: Settings) -> None:
    # many chains ready: a batch follows as many as the free slots' share, so the chains
    # advance side by side and none is left alone at the end
    with committed_db() as s:
        heads = [add_step(s, f"h{i}") for i in range(4)]
        for i, head in enumerate(heads):
            add_step(s, f"n{i}", state="pending", deps=[head])
        s.commit()
    builder = LocalBuilder(settings, committed_db, local_capabilities(settings), slots=2)
    builder.active["local:other-slot"] = cast(Any, None)
    got = in_transaction(committed_db, lambda s: builder.claim_batch(
        s, StepHolder(settings, committed_db, "slot-1"), CLS))
    assert set(heads) <= {c.id for c in got}
    assert len(got) == 8


def test_a_slot_alone_on_its_class_claims_longer_batches(
        committed_db: sessionmaker[Session], make_settings: Callable[..., Settings]) -> None:
    # nobody else could build these steps: a slot takes up to batch_size_alone (fewer
    # nix-store starts); once another consumer of the class is live (here an SSH
    # builder with two slots, then another runner's heartbeat), up to batch_size, and
    # its share of the queue is divided among every consumer's slots
    settings = make_settings(queue_runner={"batch_size": 3, "batch_size_alone": 8})
    with committed_db() as s:
        chains = []
        for c in range(8):
            link = add_step(s, f"c{c}-0")
            chain = [link]
            for i in range(1, 10):
                link = add_step(s, f"c{c}-{i}", state="pending", deps=[link])
                chain.append(link)
            chains.append(chain)
        # this runner's own heartbeat does not count as another consumer
        s.execute(text("""
            INSERT INTO service_heartbeats (service, kind, hostname, pid, version, started_at,
                                            last_heartbeat, details)
            VALUES ('queue-runner-me@h', 'queue-runner', 'h', 1, 'x', now(), now(),
                    CAST(:details AS jsonb))
        """), {"details": f'{{"capabilities": [{{"systems": ["{CLS}"]}}], "workers": 2, '
                          '"local_builder": "local:me"}'})
        s.commit()

    def claim_batch(builder: LocalBuilder, slot: str) -> list[int]:
        return [c.id for c in in_transaction(committed_db, lambda s: builder.claim_batch(
            s, StepHolder(settings, committed_db, slot), CLS))]

    def builder() -> LocalBuilder:
        return LocalBuilder(settings, committed_db, local_capabilities(settings), slots=2,
                            name="local:me")

    # 8 chain heads, 2 slots: a share of 4 heads, then look-ahead waves up to 8 in all
    assert sorted(claim_batch(builder(), "slot-1")) == sorted(chains[0][:2] + chains[1][:2]
                                                      + chains[2][:2] + chains[3][:2])
    with committed_db() as s:
        s.execute(text("""
            INSERT INTO remote_builders (name, ssh_uri, systems, max_jobs, supported_features,
                                         mandatory_features, public_host_key)
            VALUES ('ssh1', 'ssh://b', ARRAY[:cls], 2, '{}', '{}', 'ssh-ed25519 AAAA')
        """), {"cls": CLS})
        s.commit()
    # 4 heads queued, 2 + 2 slots: a share of one, look-ahead up to batch_size (3)
    assert claim_batch(builder(), "slot-2") == chains[4][:3]
    with committed_db() as s:
        s.execute(text("DELETE FROM remote_builders"))
        s.execute(text("""
            INSERT INTO service_heartbeats (service, kind, hostname, pid, version, started_at,
                                            last_heartbeat, details)
            VALUES ('queue-runner-other@h', 'queue-runner', 'h', 2, 'x', now(), now(),
                    CAST(:details AS jsonb))
        """), {"details": f'{{"capabilities": [{{"systems": ["{CLS}"]}}], "workers": 1, '
                          '"local_builder": "local:other"}'})
        s.commit()
    assert claim_batch(builder(), "slot-3") == chains[5][:3]


def test_a_slot_shares_with_the_slots_not_building(committed_db: sessionmaker[Session],
                                                   settings: Settings) -> None:
    # ten independent steps queued, two slots, one of them building: the idle slot
    # takes them all (halving what is left batch after batch cost a nix-store start each)
    with committed_db() as s:
        ids = [add_step(s, f"f{i}") for i in range(10)]
        s.commit()
    builder = LocalBuilder(settings, committed_db, local_capabilities(settings), slots=2)
    builder.active["local:other-slot"] = cast(Any, None)
    got = in_transaction(committed_db, lambda s: builder.claim_batch(
        s, StepHolder(settings, committed_db, "slot-1"), CLS))
    assert sorted(c.id for c in got) == ids


def test_a_slot_takes_a_fan_in_whole_while_the_other_builds(
        committed_db: sessionmaker[Session], settings: Settings) -> None:
    # the fan-in steps all feed one top step: it waits for every one of them, so no
    # look-ahead chain hangs on a single step and the idle slot takes them all
    with committed_db() as s:
        ids = [add_step(s, f"f{i}") for i in range(6)]
        top = add_step(s, "top", state="pending", deps=ids)
        s.commit()
    builder = LocalBuilder(settings, committed_db, local_capabilities(settings), slots=2)
    builder.active["local:other-slot"] = cast(Any, None)
    got = in_transaction(committed_db, lambda s: builder.claim_batch(
        s, StepHolder(settings, committed_db, "slot-1"), CLS))
    assert sorted(c.id for c in got) == sorted([*ids, top])
