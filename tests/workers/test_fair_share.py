"""How many steps one remote worker's claim may take (``RemoteWorkers.fair_share``): a
batch, but no more than its share of the queued class over the live remote workers'
slots, so one worker never takes a batch while another's slots idle. Real PostgreSQL."""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.orm import Session

from circus.common.heartbeat import QUEUE_RUNNER_KIND, beat
from circus.remote_workers.service import RemoteWorkers
from tests.queue_runner.test_claims import CLS, add_step


def worker_beats(session: Session, name: str, slots: int, stale: bool = False) -> None:
    beat(session, QUEUE_RUNNER_KIND, {"remote_worker": name, "workers": slots},
         service=f"remote-worker:{name}", host=(name, None))
    if stale:
        session.execute(text("UPDATE service_heartbeats SET last_heartbeat = now() - "
                             "interval '1 hour' WHERE service = :s"),
                        {"s": f"remote-worker:{name}"})


def test_a_claim_takes_a_batch_but_no_more_than_its_fair_share(db: Session) -> None:
    # nothing queued: nothing to take
    assert RemoteWorkers.fair_share(db, CLS, 8) == 0
    for i in range(30):
        add_step(db, f"fair{i}")
    add_step(db, "other-class", cls="aarch64-linux")
    add_step(db, "running", state="running")
    # one live worker of 2 slots: 30 // 2 = 15, bounded by the batch asked for
    worker_beats(db, "a", 2)
    assert RemoteWorkers.fair_share(db, CLS, 8) == 8
    assert RemoteWorkers.fair_share(db, CLS, 64) == 15
    # three live workers of 2 slots: 30 // 6 = 5 (a stale one does not count)
    worker_beats(db, "b", 2)
    worker_beats(db, "c", 2)
    worker_beats(db, "gone", 16, stale=True)
    assert RemoteWorkers.fair_share(db, CLS, 8) == 5
    # fewer queued than slots: one step a claim, never none
    db.execute(text("DELETE FROM steps WHERE state = 'queued' AND queue_class = :c "
                    "AND id NOT IN (SELECT min(id) FROM steps WHERE queue_class = :c)"),
               {"c": CLS})
    assert RemoteWorkers.fair_share(db, CLS, 8) == 1
