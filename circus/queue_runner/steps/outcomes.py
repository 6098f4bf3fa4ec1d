"""Finishing steps: the one conditional write path for every consumer.

Local workers, SSH workers and the agent gateway report what happened to the
steps they hold through :func:`finish_steps`, called by their
``steps.holder.StepHolder.finish``. It only touches steps the
caller still holds (``state = 'running' AND worker = <caller>``), so a step is
never finished twice, even when a worker whose lease lapsed comes back.

Then, in the same transaction:

- dependents whose dependencies all succeeded become ``queued`` (their class
  queues get wake-ups after commit, no dispatcher round trip);
- a failure fails every pending dependent (``dependency_failed``, or
  ``unsupported_system`` when no machine could take the step) and enters the
  failed-path cache;
- builds whose top-level step finished are finished (``results``).

Lost-wakeup safety: dependents are locked (in id order) *before* their
dependencies are checked, in a later statement than the update of the
finished steps. Two transactions finishing the last two dependencies of one
step therefore serialise on that step's row, and the second sees the first's
commit.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import text
from sqlalchemy.orm import Session

from circus.common.config import Settings
from circus.common.enums import BuildStatus
from circus.common.statussql import UNFINISHED, dependencies_succeeded
from circus.queue_runner.builds.products import OutputResult
from circus.queue_runner.builds.results import BuildsReport, settle_builds_of_steps

log = logging.getLogger(__name__)

#: failures worth remembering: building the same derivation again fails the same way
CACHEABLE_FAILURES = frozenset({
    BuildStatus.failed, BuildStatus.timeout, BuildStatus.log_limit_exceeded,
    BuildStatus.nar_size_limit_exceeded,
})

#: how a dependency's failure shows on its dependents
PROPAGATES_AS = {BuildStatus.unsupported_system: BuildStatus.unsupported_system}

@dataclass
class StepOutcome:
    """What became of a step, as reported by whoever built it."""

    step_id: int
    status: BuildStatus
    exit_code: int | None = None
    error_message: str | None = None
    log_path: str | None = None
    log_size: int | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    machine: str | None = None
    #: an infrastructure failure (``aborted``): retry with back-off while attempts remain
    retry: bool = False
    #: for ``dependency_failed``: the step whose failure caused it
    propagated_from: int | None = None


@dataclass(frozen=True)
class DoneStep:
    id: int
    status: BuildStatus
    drv_path: str
    is_fod: bool


@dataclass
class FinishReport:
    finished: list[int] = field(default_factory=list)
    requeued: list[int] = field(default_factory=list)
    #: queue class -> steps that became queued (publish wake-ups after commit)
    queued: Counter[str] = field(default_factory=Counter)
    builds: BuildsReport = field(default_factory=BuildsReport)

    def merge(self, other: FinishReport) -> None:
        self.finished.extend(other.finished)
        self.requeued.extend(other.requeued)
        self.queued.update(other.queued)
        self.builds.merge(other.builds)


def finish_step(session: Session, settings: Settings, step_id: int, worker: str,
                outcome: StepOutcome, result: OutputResult | None = None) -> FinishReport:
    """Finish one step the caller holds (see :func:`finish_steps`)."""
    results: dict[int, OutputResult] = {step_id: result} if result is not None else {}
    return finish_steps(session, settings, worker, [outcome], results)


def finish_steps(session: Session, settings: Settings, worker: str | None,
                 outcomes: Iterable[StepOutcome],
                 results: Mapping[int, OutputResult] | None = None) -> FinishReport:
    """Finish steps held by ``worker`` (``None``: any holder whose lease expired).

    ``results`` maps step ids to what was read from their outputs. Steps the
    caller no longer holds are skipped (and not in ``report.finished``).
    """
    outcomes = list(outcomes)
    report = FinishReport()
    retries = [o for o in outcomes if o.status is BuildStatus.aborted and o.retry]
    finals = [o for o in outcomes if not (o.status is BuildStatus.aborted and o.retry)]
    if retries:
        requeued = _requeue_for_retry(session, settings, worker, retries)
        report.requeued.extend(requeued)
        for outcome in retries:
            if outcome.step_id not in requeued:
                # attempts exhausted (or not ours any more: the conditional update decides)
                finals.append(StepOutcome(**{**outcome.__dict__, "retry": False}))
    if not finals:
        return report
    done = _mark_done(session, worker, finals)
    report.finished.extend(d.id for d in done)
    if done:
        report.merge(after_steps_done(session, settings, done, results or {}))
    return report


def _requeue_for_retry(session: Session, settings: Settings, worker: str | None,
                       outcomes: list[StepOutcome]) -> list[int]:
    runner = settings.queue_runner
    rows = session.execute(text(f"""
        UPDATE steps AS s SET
            state = CASE WHEN {dependencies_succeeded("s")}
                         THEN 'queued' ELSE 'pending' END,
            worker = NULL, lease_until = NULL, started_at = NULL, machine = NULL,
            attempts = s.attempts + 1,
            not_before = now() + make_interval(secs => :backoff * power(2, s.attempts)),
            queued_at = now(), published_at = NULL,
            error_message = v.error_message, exit_code = v.exit_code,
            log_path = COALESCE(v.log_path, s.log_path), log_size = COALESCE(v.log_size, s.log_size)
        FROM unnest(CAST(:ids AS bigint[]), CAST(:errors AS text[]), CAST(:codes AS integer[]),
                    CAST(:logs AS text[]), CAST(:sizes AS bigint[]))
             AS v(id, error_message, exit_code, log_path, log_size)
        WHERE s.id = v.id AND s.state = 'running'
          AND (CAST(:worker AS text) IS NULL OR s.worker = :worker)
          AND s.attempts < :max_retries
        RETURNING s.id
    """), {
        "ids": [o.step_id for o in outcomes],
        "errors": [o.error_message for o in outcomes],
        "codes": [o.exit_code for o in outcomes],
        "logs": [o.log_path for o in outcomes],
        "sizes": [o.log_size for o in outcomes],
        "worker": worker,
        "backoff": float(runner.retry_backoff_secs),
        "max_retries": runner.max_retries,
    }).scalars().all()
    return list(rows)


def _mark_done(session: Session, worker: str | None, outcomes: list[StepOutcome]
               ) -> list[DoneStep]:
    outcomes = sorted(outcomes, key=lambda o: o.step_id)
    rows = session.execute(text("""
        UPDATE steps AS s SET
            state = 'done', status = v.status, exit_code = v.exit_code,
            error_message = v.error_message,
            log_path = COALESCE(v.log_path, s.log_path),
            log_size = COALESCE(v.log_size, s.log_size),
            started_at = COALESCE(v.started_at, s.started_at),
            finished_at = COALESCE(v.finished_at, now()),
            machine = COALESCE(v.machine, s.machine),
            lease_until = NULL
        FROM unnest(CAST(:ids AS bigint[]), CAST(:statuses AS smallint[]),
                    CAST(:codes AS integer[]), CAST(:errors AS text[]), CAST(:logs AS text[]),
                    CAST(:sizes AS bigint[]), CAST(:started AS timestamptz[]),
                    CAST(:finished AS timestamptz[]), CAST(:machines AS text[]))
             AS v(id, status, exit_code, error_message, log_path, log_size, started_at,
                  finished_at, machine)
        WHERE s.id = v.id AND s.state = 'running'
          AND (CAST(:worker AS text) IS NULL OR s.worker = :worker)
        RETURNING s.id, s.status, s.drv_path, s.is_fod
    """), {
        "ids": [o.step_id for o in outcomes],
        "statuses": [int(o.status) for o in outcomes],
        "codes": [o.exit_code for o in outcomes],
        "errors": [o.error_message for o in outcomes],
        "logs": [o.log_path for o in outcomes],
        "sizes": [o.log_size for o in outcomes],
        "started": [o.started_at for o in outcomes],
        "finished": [o.finished_at for o in outcomes],
        "machines": [o.machine for o in outcomes],
        "worker": worker,
    }).all()
    done = sorted((DoneStep(r.id, BuildStatus(r.status), r.drv_path, r.is_fod) for r in rows),
                  key=lambda d: d.id)
    ids = {d.id for d in done}
    propagated = [(o.step_id, o.propagated_from) for o in outcomes
                  if o.step_id in ids and o.propagated_from is not None]
    for step_id, origin in propagated:
        session.execute(text(
            "UPDATE build_steps SET propagated_from_step_id = :origin WHERE step_id = :id"),
            {"origin": origin, "id": step_id})
    return done


def done_steps(session: Session, step_ids: list[int]) -> list[DoneStep]:
    rows = session.execute(text(
        "SELECT id, status, drv_path, is_fod FROM steps WHERE id = ANY(:ids) ORDER BY id"),
        {"ids": step_ids}).all()
    return [DoneStep(r.id, BuildStatus(r.status), r.drv_path, r.is_fod) for r in rows]


def after_steps_done(session: Session, settings: Settings, rows: list[DoneStep],
                     results: Mapping[int, OutputResult],
                     queue_only: Collection[int] | None = None, *,
                     advance: bool = True) -> FinishReport:
    """Consequences of steps that just became done (in this transaction).

    ``queue_only`` limits the dependents queued to those steps (a dispatcher
    catching up on steps a worker already finished). ``advance``: see
    :func:`~circus.queue_runner.builds.results.finish_builds`.
    """
    report = FinishReport()
    succeeded = [r.id for r in rows if r.status is BuildStatus.succeeded]
    failed: list[tuple[int, BuildStatus, str, bool]] = [
        (r.id, r.status, r.drv_path, r.is_fod) for r in rows
        if r.status is not BuildStatus.succeeded]
    drv_results = {r.drv_path: results[r.id] for r in rows if r.id in results}
    if succeeded:
        report.queued.update(queue_ready_dependents(session, succeeded, queue_only))
    touched = [r.id for r in rows]
    if failed:
        _remember_failures(session, settings, failed)
        for step_id, status, drv_path, _ in failed:
            if status is BuildStatus.cancelled:
                continue
            touched.extend(propagate_failure(session, step_id, status, drv_path))
    report.builds = settle_builds_of_steps(session, settings, touched, drv_results,
                                           advance=advance)
    failed_builds = [b for b, status in report.builds.finished if not status.is_success]
    if failed_builds:
        report.merge(drop_orphan_steps(session, settings, failed_builds))
    return report


def queue_ready_dependents(session: Session, step_ids: list[int],
                           only: Collection[int] | None = None) -> Counter[str]:
    """Pending dependents of ``step_ids`` (of those, only ``only``) whose dependencies all
    succeeded → queued."""
    # NO KEY UPDATE: the lock an UPDATE of non-key columns takes; it does not wait for
    # the key-share locks a dispatcher's new edges hold on these rows
    locked = session.execute(text("""
        SELECT s.id FROM steps s
        WHERE s.id IN (SELECT e.step_id FROM step_dependencies e
                       WHERE e.depends_on_id = ANY(:ids))
          AND s.state = 'pending'
          AND (CAST(:only AS bigint[]) IS NULL OR s.id = ANY(CAST(:only AS bigint[])))
        ORDER BY s.id FOR NO KEY UPDATE OF s
    """), {"ids": step_ids, "only": None if only is None else sorted(only)}).scalars().all()
    if not locked:
        return Counter()
    classes = session.execute(text(f"""
        UPDATE steps AS s SET state = 'queued', queued_at = now(), published_at = now()
        WHERE s.id = ANY(:ids) AND s.state = 'pending' AND {dependencies_succeeded("s")}
        RETURNING s.queue_class
    """), {"ids": list(locked)}).scalars().all()
    return Counter(classes)


def propagate_failure(session: Session, step_id: int, status: BuildStatus, drv_path: str
                      ) -> list[int]:
    """Fail every pending (transitive) dependent of a failed step; returns their ids."""
    as_status = PROPAGATES_AS.get(status, BuildStatus.dependency_failed)
    locked = session.execute(text("""
        WITH RECURSIVE dependents(id) AS (
            SELECT e.step_id FROM step_dependencies e WHERE e.depends_on_id = :id
            UNION
            SELECT e.step_id FROM step_dependencies e JOIN dependents d ON e.depends_on_id = d.id
        )
        SELECT s.id FROM steps s
        WHERE s.id IN (SELECT id FROM dependents) AND s.state = 'pending'
        ORDER BY s.id FOR NO KEY UPDATE OF s
    """), {"id": step_id}).scalars().all()
    if not locked:
        return []
    failed = session.execute(text("""
        UPDATE steps SET state = 'done', status = :status, finished_at = now(),
                         error_message = :message
        WHERE id = ANY(:ids) AND state = 'pending'
        RETURNING id
    """), {"ids": list(locked), "status": int(as_status),
           "message": f"dependency {drv_path} failed ({status.name})"}).scalars().all()
    if failed:
        # the cause, not the messenger: a step that itself failed for a dependency (its
        # origin recorded with its outcome) passes on that dependency
        session.execute(text("""
            UPDATE build_steps SET propagated_from_step_id = coalesce(
                (SELECT max(o.propagated_from_step_id) FROM build_steps o
                 WHERE o.step_id = :failed), :failed)
            WHERE step_id = ANY(:ids)
        """), {"failed": step_id, "ids": list(failed)})
    return list(failed)


def _remember_failures(session: Session, settings: Settings,
                       failed: list[tuple[int, BuildStatus, str, bool]]) -> None:
    runner = settings.queue_runner
    if not runner.failed_paths_cache:
        return
    # a fixed-output derivation usually fails for a reason outside it (a download):
    # its error message is recorded on the step, but it is not cached as a failure
    cacheable = [(step_id, status, drv) for step_id, status, drv, is_fod in failed
                 if status in CACHEABLE_FAILURES and not is_fod]
    if not cacheable:
        return
    session.execute(text("""
        INSERT INTO failed_paths (drv_path, build_id, status, failed_at)
        SELECT v.drv_path,
               (SELECT bs.build_id FROM build_steps bs WHERE bs.step_id = v.step_id
                ORDER BY bs.is_toplevel DESC, bs.build_id LIMIT 1),
               v.status, now()
        FROM unnest(CAST(:ids AS bigint[]), CAST(:drvs AS text[]), CAST(:statuses AS smallint[]))
             AS v(step_id, drv_path, status)
        ON CONFLICT (drv_path) DO UPDATE
            SET build_id = EXCLUDED.build_id, status = EXCLUDED.status,
                failed_at = EXCLUDED.failed_at
    """), {"ids": [c[0] for c in cacheable], "drvs": [c[2] for c in cacheable],
           "statuses": [int(c[1]) for c in cacheable]})


def drop_orphan_steps(session: Session, settings: Settings, build_ids: list[int]
                      ) -> FinishReport:
    """Cancel pending/queued steps that only finished builds were waiting for.

    Running steps are left to finish: their outputs may serve a later build.
    """
    locked = session.execute(text(f"""
        SELECT s.id FROM steps s
        WHERE s.id IN (SELECT step_id FROM build_steps WHERE build_id = ANY(:builds))
          AND s.state IN ('pending', 'queued')
          AND NOT EXISTS (
              SELECT 1 FROM build_steps bs JOIN builds b ON b.id = bs.build_id
              WHERE bs.step_id = s.id AND b.status IN {UNFINISHED})
        ORDER BY s.id FOR UPDATE OF s
    """), {"builds": build_ids}).scalars().all()
    if not locked:
        return FinishReport()
    session.execute(text("""
        UPDATE steps SET state = 'done', status = :status, finished_at = now(),
                         error_message = 'no unfinished build needs this step any more'
        WHERE id = ANY(:ids) AND state IN ('pending', 'queued')
    """), {"ids": list(locked), "status": int(BuildStatus.cancelled)})
    return FinishReport(finished=list(locked))
