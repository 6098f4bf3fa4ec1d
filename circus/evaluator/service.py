"""Evaluator service functions: the one write path for evaluations.

The API, webhooks, beat and the CLI all call these. ``trigger`` creates the
evaluation and enqueues it; :func:`check_jobset` is the scheduled check (fetch,
skip when unchanged, then trigger).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy import func, select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

import celeryconfig
from circus.common.celery import enqueue
from circus.common.config import Settings
from circus.common.enums import (
    BuildStatus,
    EvaluationStatus,
    JobsetState,
    TriggerKind,
    TriggerMode,
)
from circus.common.errors import Conflict, NotFound
from circus.common.messaging import EVALUATE_TASK
from circus.common.models import Build, Evaluation, EvaluationBuild, Jobset
from circus.common.statussql import EVALUATION_ACTIVE

log = logging.getLogger(__name__)

ACTIVE = (EvaluationStatus.pending, EvaluationStatus.running)


@dataclass(frozen=True)
class PullRequest:
    number: int
    head_branch: str
    base_branch: str
    action: str
    head_sha: str | None = None


@dataclass
class Comparison:
    """Jobs that differ between two evaluations (``new`` vs ``old``)."""

    new_jobs: list[str] = field(default_factory=list)
    removed_jobs: list[str] = field(default_factory=list)
    changed_jobs: list[str] = field(default_factory=list)
    unchanged_count: int = 0


def utcnow() -> datetime:
    return datetime.now(UTC)


def active_evaluation(session: Session, jobset_id: int) -> Evaluation | None:
    return session.scalars(select(Evaluation).where(
        Evaluation.jobset_id == jobset_id, Evaluation.status.in_(ACTIVE))).first()


def trigger(session: Session, jobset_id: int, kind: TriggerKind, *,
            requested_by: str | None = None, pull_request: PullRequest | None = None,
            ) -> tuple[Evaluation, bool]:
    """Create a pending evaluation and enqueue it after commit.

    Returns ``(evaluation, created)``; when the jobset already has a pending or
    running evaluation, that one is returned with ``created=False``. Raises
    ``NotFound`` for an unknown jobset and ``Conflict`` for a disabled one.
    """
    jobset = session.get(Jobset, jobset_id)
    if jobset is None:
        raise NotFound(f"jobset {jobset_id} does not exist")
    if jobset.state is JobsetState.disabled:
        raise Conflict(f"jobset {jobset.project.name}/{jobset.name} is disabled")
    if not jobset.project.enabled:
        raise Conflict(f"project {jobset.project.name} is disabled")
    existing = active_evaluation(session, jobset_id)
    if existing is not None:
        return existing, False
    values: dict[str, object] = {
        "jobset_id": jobset_id, "trigger_kind": kind.value,
        "status": EvaluationStatus.pending.value, "requested_by": requested_by,
        "inputs": {},
    }
    if pull_request is not None:
        values.update(pr_number=pull_request.number, pr_head_branch=pull_request.head_branch,
                      pr_base_branch=pull_request.base_branch, pr_action=pull_request.action,
                      commit_hash=pull_request.head_sha)
    # The partial unique index allows one unfinished evaluation per jobset; a
    # concurrent trigger waits here for the other transaction and then inserts
    # nothing (no exception, no savepoint needed).
    new_id = session.execute(
        insert(Evaluation).values(values)
        .on_conflict_do_nothing(index_elements=["jobset_id"],
                                index_where=text(f"status IN {EVALUATION_ACTIVE}"))
        .returning(Evaluation.id)).scalar()
    if new_id is None:
        existing = active_evaluation(session, jobset_id)
        if existing is None:  # the other one finished meanwhile: try once more
            return trigger(session, jobset_id, kind, requested_by=requested_by,
                           pull_request=pull_request)
        return existing, False
    evaluation = session.get_one(Evaluation, new_id)
    enqueue(session, EVALUATE_TASK, evaluation.id, queue=celeryconfig.EVAL_QUEUE)
    return evaluation, True


def cancel_evaluation(session: Session, evaluation_id: int) -> Evaluation:
    """Cancel a pending/running evaluation (its worker kills the Nix process within a
    second) and the pending builds it created.

    A completed evaluation keeps its status; its pending builds are cancelled.
    ``Conflict`` for an evaluation that failed, timed out or was already cancelled.
    """
    evaluation = session.get(Evaluation, evaluation_id)
    if evaluation is None:
        raise NotFound(f"evaluation {evaluation_id} does not exist")
    now = utcnow()
    if evaluation.status in ACTIVE:
        session.execute(
            update(Evaluation)
            .where(Evaluation.id == evaluation_id, Evaluation.status.in_(ACTIVE))
            .values(status=EvaluationStatus.cancelled, finished_at=now,
                    error_message="cancelled"))
    elif evaluation.status is not EvaluationStatus.completed:
        raise Conflict(f"evaluation {evaluation_id} already finished "
                       f"({evaluation.status.value})")
    created = select(EvaluationBuild.build_id).where(
        EvaluationBuild.evaluation_id == evaluation_id, EvaluationBuild.is_new)
    session.execute(
        update(Build)
        .where(Build.id.in_(created), Build.status == BuildStatus.pending)
        .values(status=BuildStatus.cancelled, completed_at=now,
                error_message="evaluation cancelled", notification_pending_since=now),
        execution_options={"synchronize_session": False})
    session.refresh(evaluation)
    return evaluation


def compare(session: Session, evaluation_id: int, other_id: int) -> Comparison:
    """Jobs new in ``evaluation_id``, removed since ``other_id``, or with a changed drv.

    Builds both evaluations hold are only counted (an evaluation holds one build per
    job): the jobs of the few others are all that is read, not thousands per side.
    Both sides' memberships are read once from their index alone and grouped by build:
    a build held by one side only is a difference (two ``EXCEPT``s, one per side, read
    each membership twice; probing one side for every row of the other read both
    sides' rows from the membership table, thousands of scattered pages).
    """
    for ident in (evaluation_id, other_id):
        if session.get(Evaluation, ident) is None:
            raise NotFound(f"evaluation {ident} does not exist")
    held_by = func.min(EvaluationBuild.evaluation_id)
    held_alone = (select(EvaluationBuild.build_id, held_by.label("side"))
                  .where(EvaluationBuild.evaluation_id.in_([evaluation_id, other_id]))
                  .group_by(EvaluationBuild.build_id)
                  .having(func.count() == 1).subquery())
    sides: dict[int, dict[str, str]] = {evaluation_id: {}, other_id: {}}
    for eid, job, drv in session.execute(
            select(held_alone.c.side, Build.job_name, Build.drv_path)
            .join(Build, Build.id == held_alone.c.build_id)):
        sides[eid][job] = drv
    held = int(session.scalar(select(func.count()).where(
        EvaluationBuild.evaluation_id == evaluation_id)) or 0)
    shared = held - len(sides[evaluation_id])
    new, old = sides[evaluation_id], sides[other_id]
    both = set(new) & set(old)
    return Comparison(
        new_jobs=sorted(set(new) - set(old)),
        removed_jobs=sorted(set(old) - set(new)),
        changed_jobs=sorted(n for n in both if new[n] != old[n]),
        unchanged_count=shared + sum(1 for n in both if new[n] == old[n]),
    )


# ---------------------------------------------------------------------------
# the scheduled check


def has_unfinished_builds(session: Session, jobset_id: int) -> bool:
    """Whether the jobset's last evaluation still has pending or running builds."""
    last = session.scalar(
        select(Evaluation.id).where(Evaluation.jobset_id == jobset_id,
                                    Evaluation.status == EvaluationStatus.completed,
                                    Evaluation.pr_number.is_(None))
        .order_by(Evaluation.id.desc()).limit(1))
    if last is None:
        return False
    return session.scalar(
        select(func.count()).select_from(EvaluationBuild)
        .join(Build, Build.id == EvaluationBuild.build_id)
        .where(EvaluationBuild.evaluation_id == last,
               Build.status.in_((BuildStatus.pending, BuildStatus.running)))) != 0


def last_inputs_hash(session: Session, jobset_id: int) -> str | None:
    """Inputs hash of the last evaluation that ran to an answer (completed, or failed on
    the expression itself); timed-out, cancelled and crashed ones do not count."""
    return session.scalar(
        select(Evaluation.inputs_hash)
        .where(Evaluation.jobset_id == jobset_id, Evaluation.pr_number.is_(None),
               Evaluation.status.in_((EvaluationStatus.completed, EvaluationStatus.failed)),
               Evaluation.inputs_hash.is_not(None))
        .order_by(Evaluation.id.desc()).limit(1))


def _record_check(session: Session, jobset: Jobset, outcome: str, *,
                  error: str | None = None) -> None:
    now = utcnow()
    values: dict[str, object] = {"last_checked_at": now, "last_check_outcome": outcome}
    if outcome == "error":
        values.update(error_message=error, error_at=now)
    elif outcome in ("unchanged", "evaluated"):
        values.update(error_message=None, error_at=None)
    session.execute(update(Jobset).where(Jobset.id == jobset.id).values(**values))


def check_jobset(session: Session, settings: Settings, jobset_id: int) -> str:
    """The scheduled check of one jobset; returns (and records) what it did:
    ``evaluated`` (an evaluation was triggered), ``unchanged``, ``busy``, ``error``
    or ``disabled``. The caller commits."""
    from circus.evaluator.inputs import InputError, resolve

    jobset = session.get(Jobset, jobset_id)
    if jobset is None or jobset.state is JobsetState.disabled or not jobset.project.enabled:
        return "disabled"
    if active_evaluation(session, jobset_id) is not None:
        _record_check(session, jobset, "busy")
        return "busy"
    waits = (jobset.trigger_mode is TriggerMode.interval
             or jobset.state is JobsetState.one_at_a_time)
    if waits and has_unfinished_builds(session, jobset_id):
        _record_check(session, jobset, "busy")
        return "busy"
    try:
        resolution = resolve(session, settings, jobset)
    except InputError as exc:
        log.info("jobset %s: %s", jobset_id, exc)
        _record_check(session, jobset, "error", error=str(exc))
        return "error"
    if (jobset.trigger_mode is TriggerMode.source_change
            and last_inputs_hash(session, jobset_id) == resolution.inputs_hash):
        _record_check(session, jobset, "unchanged")
        return "unchanged"
    kind = (TriggerKind.interval if jobset.trigger_mode is TriggerMode.interval
            else TriggerKind.source_change)
    trigger(session, jobset_id, kind, requested_by="scheduler")
    _record_check(session, jobset, "evaluated")
    return "evaluated"
