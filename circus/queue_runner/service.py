"""Queue-runner service functions: user actions on builds.

The API, dashboard and CLI call these (one write path per action). They only
change rows; the daemons react: a cancelled running step is noticed by its
worker at the next lease renewal (≤ 2 s), which kills its builder; a
restarted build is stepped again by the dispatcher, woken by ``NOTIFY``.
"""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.orm import Session

from circus.common.enums import BuildStatus
from circus.common.errors import Conflict, NotFound
from circus.common.messaging import BUILDS_CHANNEL, GC_CHANNEL
from circus.common.models import Build
from circus.common.statussql import FAILED, PENDING, SUCCEEDED, UNFINISHED
from circus.queue_runner.builds.results import finish_aggregates


def _locked_build(session: Session, build_id: int) -> Build:
    build = session.get(Build, build_id, with_for_update=True, populate_existing=True)
    if build is None:
        raise NotFound(f"build {build_id} does not exist")
    return build


def cancel_build(session: Session, build_id: int, *, reason: str | None = None) -> Build:
    """Cancel a pending or running build (a running step's process group is killed).

    Raises ``NotFound``; ``Conflict`` when the build already finished.
    """
    build = _locked_build(session, build_id)
    if build.status.is_finished:
        raise Conflict(f"build {build_id} already finished ({build.status.name})")
    cancel_builds(session, [build_id], reason=reason)
    session.refresh(build)
    return build


def cancel_evaluation_builds(session: Session, evaluation_id: int, *,
                             reason: str | None = None) -> list[int]:
    """Cancel the unfinished builds of an evaluation; returns their ids.

    The evaluator's ``cancel_evaluation`` calls this.
    """
    ids = session.execute(text(f"""
        SELECT id FROM builds
        WHERE status IN {UNFINISHED}
          AND (evaluation_id = :eid
               OR id IN (SELECT build_id FROM evaluation_builds WHERE evaluation_id = :eid))
        ORDER BY id
    """), {"eid": evaluation_id}).scalars().all()
    return cancel_builds(session, list(ids),
                         reason=reason or f"evaluation {evaluation_id} was cancelled")


def cancel_builds(session: Session, build_ids: list[int], *, reason: str | None = None
                  ) -> list[int]:
    """Cancel unfinished builds and every step only they were waiting for."""
    if not build_ids:
        return []
    cancelled = session.execute(text(f"""
        WITH locked AS (
            SELECT id FROM builds WHERE id = ANY(:ids) AND status IN {UNFINISHED}
            ORDER BY id FOR UPDATE
        )
        UPDATE builds SET status = :status, completed_at = now(), error_message = :reason,
                          started_at = COALESCE(started_at, now()),
                          notification_pending_since = now()
        FROM locked WHERE builds.id = locked.id
        RETURNING builds.id
    """), {"ids": sorted(build_ids), "status": int(BuildStatus.cancelled),
           "reason": reason or "cancelled"}).scalars().all()
    if not cancelled:
        return []
    # Lock first, check in a later statement: a dispatcher linking a new build to one
    # of these steps holds it FOR SHARE; once it committed, this statement sees the link.
    unneeded = f"""NOT EXISTS (
        SELECT 1 FROM build_steps bs JOIN builds b ON b.id = bs.build_id
        WHERE bs.step_id = s.id AND b.status IN {UNFINISHED})"""
    locked = session.execute(text(f"""
        SELECT s.id FROM steps s
        WHERE s.id IN (SELECT step_id FROM build_steps WHERE build_id = ANY(:ids))
          AND s.state <> 'done' AND {unneeded}
        ORDER BY s.id FOR UPDATE OF s
    """), {"ids": list(cancelled)}).scalars().all()
    if locked:
        session.execute(text(f"""
            UPDATE steps AS s SET state = 'done', status = :status, finished_at = now(),
                                  lease_until = NULL,
                                  error_message = 'cancelled: no unfinished build needs it'
            WHERE s.id = ANY(:ids) AND s.state <> 'done' AND {unneeded}
        """), {"ids": list(locked), "status": int(BuildStatus.cancelled)})
    aggregates = session.execute(text("""
        SELECT DISTINCT aggregate_id FROM build_constituents WHERE constituent_id = ANY(:ids)
    """), {"ids": list(cancelled)}).scalars().all()
    if aggregates:
        # an aggregate whose constituent was cancelled cannot succeed; nothing here
        # publishes outputs, so no settings are needed
        finish_aggregates(session, None, list(aggregates))
    return list(cancelled)


def restart_build(session: Session, build_id: int) -> Build:
    """Put a finished build back to pending, clear its failed paths, and restart the
    dependents that ended ``dependency_failed`` because of it. ``Conflict`` if unfinished."""
    build = _locked_build(session, build_id)
    if not build.status.is_finished:
        raise Conflict(f"build {build_id} has not finished ({build.status.name})")
    if failed_at_evaluation(build):
        # building it again would ignore what is wrong with its constituents
        reason = (build.error_message or "").splitlines()[0] if build.error_message else ""
        raise Conflict(f"build {build_id} is an aggregate that failed at evaluation "
                       f"({reason}): fix the jobset and evaluate it again")
    # dependents that waited for one of this build's failed steps (shared steps, or the
    # step a failure was propagated from), or that depend on it as a build
    dependents = session.execute(text(f"""
        WITH failed AS (
            SELECT bs.step_id FROM build_steps bs JOIN steps s ON s.id = bs.step_id
            WHERE bs.build_id = :id AND s.state = 'done' AND s.status <> {SUCCEEDED}
        )
        SELECT DISTINCT b.id FROM builds b
        WHERE b.status = :depfailed AND b.id <> :id AND (
            b.id IN (SELECT bs.build_id FROM build_steps bs
                     WHERE bs.step_id IN (SELECT step_id FROM failed)
                        OR bs.propagated_from_step_id IN (SELECT step_id FROM failed))
            OR b.id IN (SELECT build_id FROM build_dependencies WHERE dependency_id = :id))
        ORDER BY b.id
    """), {"id": build_id, "depfailed": int(BuildStatus.dependency_failed)}).scalars().all()
    restart_builds(session, [build_id, *dependents])
    session.refresh(build)
    return build


def failed_at_evaluation(build: Build) -> bool:
    """An aggregate the evaluator failed (bad constituents, a cycle): never queued."""
    return (build.is_aggregate and build.status is BuildStatus.failed
            and build.stepped_at is None)


def restart_builds(session: Session, build_ids: list[int]) -> list[int]:
    """Reset finished builds to pending (the dispatcher steps them again); aggregates
    that failed at evaluation stay failed."""
    restarted = session.execute(text(f"""
        WITH locked AS (
            SELECT id FROM builds WHERE id = ANY(:ids) AND status NOT IN {UNFINISHED}
              AND NOT (is_aggregate AND status = {FAILED} AND stepped_at IS NULL)
            ORDER BY id FOR UPDATE
        )
        UPDATE builds SET status = {PENDING}, stepped_at = NULL, started_at = NULL,
                          completed_at = NULL, error_message = NULL, machine = NULL,
                          closure_size = NULL, notification_pending_since = NULL,
                          retry_count = retry_count + 1
        FROM locked WHERE builds.id = locked.id
        RETURNING builds.id
    """), {"ids": sorted(build_ids)}).scalars().all()
    if not restarted:
        return []
    ids = list(restarted)
    session.execute(text("""
        DELETE FROM failed_paths WHERE drv_path IN (
            SELECT drv_path FROM build_steps WHERE build_id = ANY(:ids)
            UNION SELECT drv_path FROM builds WHERE id = ANY(:ids))
    """), {"ids": ids})
    session.execute(text("DELETE FROM build_products WHERE build_id = ANY(:ids)"), {"ids": ids})
    session.execute(text("DELETE FROM build_metrics WHERE build_id = ANY(:ids)"), {"ids": ids})
    session.execute(text("SELECT pg_notify(:channel, 'restart')"), {"channel": BUILDS_CHANNEL})
    return ids


def bump_build(session: Session, build_id: int) -> Build:
    """Raise the build's priority above every queued build (and its steps')."""
    build = _locked_build(session, build_id)
    if build.status.is_finished:
        raise Conflict(f"build {build_id} already finished ({build.status.name})")
    top = session.execute(text(f"""
        SELECT GREATEST(
            COALESCE((SELECT max(priority) FROM steps WHERE state <> 'done'), 0),
            COALESCE((SELECT max(priority) FROM builds WHERE status IN {UNFINISHED}), 0))
    """)).scalar_one()
    priority = max(int(top) + 1, build.priority + 1)
    session.execute(text("UPDATE builds SET priority = :p WHERE id = :id"),
                    {"p": priority, "id": build_id})
    session.execute(text("""
        UPDATE steps SET priority = GREATEST(priority, :p)
        WHERE state <> 'done' AND id IN (SELECT step_id FROM build_steps WHERE build_id = :id)
    """), {"p": priority, "id": build_id})
    session.refresh(build)
    return build


def set_keep(session: Session, build_id: int, keep: bool) -> Build:
    """Pin (or unpin) the build's outputs with a GC root."""
    build = _locked_build(session, build_id)
    session.execute(text("UPDATE builds SET keep = :keep WHERE id = :id"),
                    {"keep": keep, "id": build_id})
    # the queue runner re-syncs its GC roots when told (and periodically anyway)
    session.execute(text("SELECT pg_notify(:channel, :id)"),
                    {"channel": GC_CHANNEL, "id": str(build_id)})
    session.refresh(build)
    return build
