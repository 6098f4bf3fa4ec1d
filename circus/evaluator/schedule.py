"""The beat tick: due jobsets, orphaned and waiting evaluations, stale GC roots."""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select, text, update
from sqlalchemy.orm import Session

import celeryconfig
from circus.common.celery import enqueue
from circus.common.config import Settings
from circus.common.enums import EvaluationStatus, JobsetState
from circus.common.messaging import CHECK_TASK, EVALUATE_TASK
from circus.common.models import Evaluation, Jobset, Project
from circus.common.statussql import EVALUATION_ACTIVE, UNFINISHED
from circus.evaluator.execution import JOBSET_LOCK, jobset_lock_key

log = logging.getLogger(__name__)

#: jobsets checked per tick at most (the rest wait for the next tick)
MAX_CHECKS_PER_TICK = 200


@dataclass
class TickReport:
    checks: list[int] = field(default_factory=list)
    reaped: list[int] = field(default_factory=list)
    republished: list[int] = field(default_factory=list)
    pruned_roots: list[int] = field(default_factory=list)


def utcnow() -> datetime:
    return datetime.now(UTC)


def due_jobsets(session: Session, now: datetime, limit: int = MAX_CHECKS_PER_TICK,
                ) -> list[int]:
    """Enabled jobsets whose ``check_interval`` has passed, stamped as checked now.

    ``SKIP LOCKED``: two evaluators ticking at once split the jobsets between them
    instead of both checking the same ones.
    """
    active = (select(Evaluation.id).where(
        Evaluation.jobset_id == Jobset.id,
        Evaluation.status.in_((EvaluationStatus.pending, EvaluationStatus.running)))
        .exists())
    rows = session.execute(
        select(Jobset.id)
        .join(Project, Project.id == Jobset.project_id)
        .where(Jobset.state != JobsetState.disabled, Project.enabled,
               Jobset.check_interval > 0,
               (Jobset.last_checked_at.is_(None))
               | (Jobset.last_checked_at
                  <= now - func.make_interval(0, 0, 0, 0, 0, 0, Jobset.check_interval)),
               ~active)
        .order_by(Jobset.last_checked_at.asc().nulls_first(), Jobset.id)
        .limit(limit)
        .with_for_update(of=Jobset, skip_locked=True)).scalars().all()
    ids = [int(i) for i in rows]
    if ids:
        session.execute(update(Jobset).where(Jobset.id.in_(ids))
                        .values(last_checked_at=now))
    return ids


def reap_orphans(session: Session) -> list[tuple[int, int]]:
    """Fail ``running`` evaluations whose worker died (their jobset lock is free);
    returns (evaluation id, jobset id) of each.

    Their inputs hash is cleared so the next check evaluates the jobset again.
    """
    running = session.execute(
        select(Evaluation.id, Evaluation.jobset_id)
        .where(Evaluation.status == EvaluationStatus.running)).all()
    reaped = []
    for evaluation_id, jobset_id in running:
        free = session.scalar(select(func.pg_try_advisory_xact_lock(
            JOBSET_LOCK, jobset_lock_key(jobset_id))))
        if not free:
            continue
        done = session.execute(
            update(Evaluation)
            .where(Evaluation.id == evaluation_id,
                   Evaluation.status == EvaluationStatus.running)
            .values(status=EvaluationStatus.failed, finished_at=utcnow(), inputs_hash=None,
                    error_message="the evaluator running this evaluation stopped "
                                  "(crash or restart); the next check evaluates again")
            .returning(Evaluation.id)).first()
        if done:
            reaped.append((int(evaluation_id), int(jobset_id)))
    return reaped


def republish_pending(session: Session, older_than: timedelta) -> list[int]:
    """Re-send evaluations still pending (lost message, or waiting for a free slot).

    Claiming is conditional, so a duplicate message is harmless.
    """
    ids = [int(i) for i in session.scalars(
        select(Evaluation.id)
        .where(Evaluation.status == EvaluationStatus.pending,
               Evaluation.created_at <= utcnow() - older_than)
        .order_by(Evaluation.id).limit(50))]
    for evaluation_id in ids:
        enqueue(session, EVALUATE_TASK, evaluation_id, queue=celeryconfig.EVAL_QUEUE)
    return ids


_ROOT_DIR = re.compile(r"^eval-(\d+)$")


def prune_gc_roots(session: Session, settings: Settings) -> list[int]:
    """Drop the .drv roots of evaluations whose builds no longer need them: the
    evaluation is finished and none of its builds is pending or running."""
    base = settings.evaluator.gc_roots_base
    if not base.is_dir():
        return []
    found = {int(m.group(1)): entry for entry in base.iterdir()
             if (m := _ROOT_DIR.match(entry.name))}
    if not found:
        return []
    keep = {int(i) for i in session.execute(text(
        "SELECT e.id FROM evaluations e WHERE e.id = ANY(:ids) AND ("
        f" e.status IN {EVALUATION_ACTIVE} OR EXISTS ("
        "  SELECT 1 FROM evaluation_builds eb JOIN builds b ON b.id = eb.build_id"
        f"  WHERE eb.evaluation_id = e.id AND b.status IN {UNFINISHED}))"),
        {"ids": list(found)}).scalars()}
    pruned = []
    for evaluation_id, entry in sorted(found.items()):
        if evaluation_id in keep:
            continue
        shutil.rmtree(entry, ignore_errors=True)
        pruned.append(evaluation_id)
    return pruned


def tick(session: Session, settings: Settings) -> TickReport:
    """One beat: the caller commits (messages go out after the commit)."""
    report = TickReport()
    now = utcnow()
    reaped = reap_orphans(session)
    report.reaped = [evaluation_id for evaluation_id, _ in reaped]
    report.republished = republish_pending(
        session, timedelta(seconds=max(5, settings.evaluator.poll_interval)))
    report.checks = due_jobsets(session, now)
    # the jobset of an evaluation that died with its evaluator is checked again now, not
    # a check_interval later (never, for a jobset without one): a triggered evaluation
    # is not lost to a crash (found by tests/faults)
    report.checks += sorted({jobset_id for _, jobset_id in reaped} - set(report.checks))
    for jobset_id in report.checks:
        enqueue(session, CHECK_TASK, jobset_id, queue=celeryconfig.EVAL_QUEUE)
    report.pruned_roots = prune_gc_roots(session, settings)
    if report.reaped:
        log.warning("reaped orphaned evaluations %s", report.reaped)
    return report
