"""Notification tasks: created from build events, delivered with back-off, retried, pruned.

Flow:

1. The queue runner stamps ``builds.notification_pending_since`` in the
   statements that already change a build (stepped = queued, a step started,
   finished or cancelled): no extra statement, no extra transaction.
2. :func:`collect_events` (beat, every ``notifications.collect_interval``) takes
   stamped builds ``FOR UPDATE SKIP LOCKED``, clears the stamp, and inserts one
   ``notification_tasks`` row per enabled config of the build's project that
   wants the event — the build's *current* state, so changes within one
   interval coalesce into the latest. Deliveries are enqueued after commit.
3. :func:`deliver` claims a task (``pending → running``), sends it, and records
   ``completed``, or ``pending`` with ``next_retry_at`` (exponential back-off),
   or ``failed`` after ``max_attempts`` or a permanent error.
4. :func:`retry_due` (beat) enqueues due tasks again and recovers tasks whose
   worker died mid-delivery; :func:`cleanup` deletes old finished tasks.

A delivery message names the attempt it is for (``deliver(task_id, attempt)``),
so duplicated messages (a re-scan while the queue is backlogged, the admin retry
racing the scan) deliver at most once per attempt.

Commit statuses are last-write-wins at the forge, so for those targets a task
with a newer sibling (same build and config) is skipped, and a task waits
while an older sibling is being delivered: statuses arrive in order.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
import re._constants as sre_constants  # type: ignore[import-not-found]
import re._parser as sre_parse  # type: ignore[import-not-found]
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import insert, select, text
from sqlalchemy.orm import Session

import celeryconfig
from circus import audit
from circus.auth.actor import Actor
from circus.auth.permissions import Action, require_permission
from circus.common.celery import enqueue
from circus.common.config import Settings
from circus.common.enums import BuildStatus, NotificationTaskStatus, NotificationType
from circus.common.errors import Conflict, InvalidInput, NotFound
from circus.common.messaging import DELIVER_TASK
from circus.common.models import NotificationConfig, NotificationTask
from circus.common.models.base import utcnow
from circus.common.repository import RepositoryUrlError
from circus.notifications.base import Delivery, DeliveryError, Event, file_key_problems
from circus.notifications.targets import TARGETS, config_problems

log = logging.getLogger(__name__)

#: a running delivery not finished after this long is considered lost (worker died)
LEASE_SECS = 300
#: an enqueued task is not enqueued again by the scan for this long (lost messages)
REDELIVER_SECS = 60
#: the newest commits (evaluations) a build's events are reported to
COMMITS_PER_BUILD = 5
#: how long a commit status waits for an older one of the same build still in flight
DEFER_SECS = 1
#: builds taken per collector transaction
COLLECT_BATCH = 2000


# ---------------------------------------------------------------------------
# configs


def validate_config(type: NotificationType, config: Mapping[str, Any], *,
                    server_side: bool = False) -> None:
    """Raise ``InvalidInput`` naming every problem of a notification config.

    ``server_side``: written by an admin in the server's (declarative) config, so it
    may name files of the server (``token_file``); configs made through the API may not.
    """
    problems = config_problems(type, config) + _jobs_problem(config) + _events_problem(config)
    if not server_side:
        problems += file_key_problems(config)
    if problems:
        raise InvalidInput(f"invalid {type.value} notification config: " + "; ".join(problems),
                           {"config": problems})


#: longest ``jobs`` filter accepted (job names are attribute paths, not essays)
JOBS_MAX_LENGTH = 256
#: unbounded quantifiers (``*``, ``+``, ``{n,}``) one filter may hold: each one more
#: multiplies the worst case by the name's length (``.*a.*b.*c`` is three)
JOBS_MAX_UNBOUNDED = 4


def _jobs_problem(config: Mapping[str, Any]) -> list[str]:
    jobs = config.get("jobs")
    if jobs is None:
        return []
    if not isinstance(jobs, str):
        return ["jobs must be a regular expression (string)"]
    problem = job_filter_problem(jobs)
    return [problem] if problem else []


def job_filter_problem(pattern: str) -> str | None:
    """Why a ``jobs`` filter is refused: too long, invalid, or able to backtrack
    catastrophically. Python's ``re`` backtracks, and the filters are run by the
    collector for every build event, so a filter like ``(a+)+$`` could stall
    notifications for everyone. Refused: nested repetition (a repeated group that
    itself repeats or alternates, the classic exponential shapes), back-references,
    and more than ``JOBS_MAX_UNBOUNDED`` unbounded quantifiers (polynomial blow-up).
    """
    if len(pattern) > JOBS_MAX_LENGTH:
        return f"jobs must be at most {JOBS_MAX_LENGTH} characters"
    try:
        tree = sre_parse.parse(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        return f"jobs is not a valid regular expression: {exc}"
    unbounded = 0

    def walk(items: Any, repeated: bool) -> str | None:
        nonlocal unbounded
        for op, value in items:
            if op in (sre_constants.MAX_REPEAT, sre_constants.MIN_REPEAT,
                      sre_constants.POSSESSIVE_REPEAT):
                _low, high, sub = value
                many = high == sre_constants.MAXREPEAT or high > 1
                if high == sre_constants.MAXREPEAT:
                    unbounded += 1
                if many and repeated and op is not sre_constants.POSSESSIVE_REPEAT:
                    return ("jobs must not nest repetitions (such as (a+)+): matching "
                            "could take exponential time")
                found = walk(sub, repeated or (many and op is not
                                               sre_constants.POSSESSIVE_REPEAT))
            elif op is sre_constants.BRANCH:
                if repeated:
                    return ("jobs must not repeat an alternation (such as (a|aa)+): "
                            "matching could take exponential time")
                found = next((p for p in (walk(branch, repeated) for branch in value[1])
                              if p), None)
            elif op in (sre_constants.GROUPREF, sre_constants.GROUPREF_EXISTS):
                return "jobs must not use back-references"
            elif op is sre_constants.SUBPATTERN:
                found = walk(value[-1], repeated)
            elif op is sre_constants.ATOMIC_GROUP:
                found = walk(value, False)
            elif op in (sre_constants.ASSERT, sre_constants.ASSERT_NOT):
                found = walk(value[1], repeated)
            else:
                found = None
            if found:
                return found
        return None

    problem = walk(tree, False)
    if problem:
        return problem
    if unbounded > JOBS_MAX_UNBOUNDED:
        return (f"jobs may use at most {JOBS_MAX_UNBOUNDED} unbounded quantifiers "
                "(*, +, {n,})")
    return None


EVENTS = frozenset(e.value for e in Event)


def _events_problem(config: Mapping[str, Any]) -> list[str]:
    events = config.get("events")
    if events is None:
        return []
    if not isinstance(events, list) or not all(isinstance(e, str) for e in events) \
            or not set(events) <= EVENTS:
        return ["events must be a list of " + ", ".join(sorted(EVENTS))]
    return []


def _event_wanted(config: Mapping[str, Any], event: Event) -> bool:
    events = config.get("events")
    return not isinstance(events, list) or event.value in events


def _job_matches(config: Mapping[str, Any], job_name: str) -> bool:
    pattern = config.get("jobs")
    if not isinstance(pattern, str) or not pattern:
        return True
    # configs saved before the filters were checked (or written to the database by
    # hand) are checked here too: an unsafe filter matches nothing
    if _unsafe_filter(pattern):
        return False
    return re.fullmatch(pattern, job_name) is not None


@functools.lru_cache(maxsize=1024)
def _unsafe_filter(pattern: str) -> bool:
    return job_filter_problem(pattern) is not None


# ---------------------------------------------------------------------------
# events → tasks


def base_url(settings: Settings) -> str:
    server = settings.server
    return (server.base_url or f"http://{server.host}:{server.port}").rstrip("/")


@dataclass
class Collected:
    #: builds whose stamp was cleared
    builds: int = 0
    #: notification tasks created
    task_ids: list[int] = field(default_factory=list)


def collect_events(session: Session, settings: Settings, *, limit: int = COLLECT_BATCH
                   ) -> Collected:
    """Turn stamped builds into notification tasks (caller commits; deliveries follow).

    Clears up to ``limit`` stamps (oldest first), reads each build of a project with
    enabled notification configs once per commit it reports to, and creates a task
    per build event and config that wants it; a delivery is enqueued per task.
    """
    picked = _take_stamped(session, limit)
    result = Collected(builds=len(picked))
    if not picked:
        return result
    configs = _enabled_configs(session, {project_id for _, project_id in picked})
    ids = sorted(build_id for build_id, project_id in picked if project_id in configs)
    if not ids:
        return result
    tasks = _tasks(settings, _build_events(session, ids), _outputs_of(session, ids), configs)
    if tasks:
        result.task_ids = list(session.scalars(
            insert(NotificationTask).returning(NotificationTask.id), tasks))
        for task_id in result.task_ids:
            enqueue(session, DELIVER_TASK, task_id, 0, queue=celeryconfig.NOTIFY_QUEUE)
    return result


def _take_stamped(session: Session, limit: int) -> list[tuple[int, int]]:
    """Clear the stamps of up to ``limit`` builds, oldest first; (build, project) of each."""
    return [(build_id, project_id) for build_id, project_id in session.execute(text("""
        WITH picked AS (
            SELECT id FROM builds WHERE notification_pending_since IS NOT NULL
            ORDER BY notification_pending_since LIMIT :limit
            FOR UPDATE SKIP LOCKED
        )
        UPDATE builds AS b SET notification_pending_since = NULL
        FROM picked WHERE b.id = picked.id
        RETURNING b.id, b.project_id
    """), {"limit": limit}).tuples()]


def _enabled_configs(session: Session, project_ids: set[int]
                     ) -> dict[int, list[NotificationConfig]]:
    """project -> its enabled notification configs, by id."""
    configs: dict[int, list[NotificationConfig]] = {}
    for config in session.scalars(select(NotificationConfig).where(
            NotificationConfig.enabled.is_(True),
            NotificationConfig.project_id.in_(project_ids))
            .order_by(NotificationConfig.id)):
        configs.setdefault(config.project_id, []).append(config)
    return configs


def _build_events(session: Session, ids: list[int]) -> list[dict[str, Any]]:
    """A row per build and commit it reports to (at most ``COMMITS_PER_BUILD``)."""
    # one event per build and commit: a build reused by newer evaluations reports to
    # their commits too (Hydra's GitHub status plugin does the same), newest first
    rows = session.execute(text("""
        SELECT b.id, b.status, b.job_name, b.system, b.drv_path, b.started_at,
               b.completed_at, b.error_message, b.is_aggregate, e.evaluation_id,
               b.jobset_id, b.project_id, e.commit_hash, e.pr_number, e.pr_head_branch,
               e.pr_base_branch, j.name AS jobset, p.name AS project, p.repository_url
        FROM builds b
        JOIN jobsets j ON j.id = b.jobset_id
        JOIN projects p ON p.id = b.project_id
        JOIN LATERAL (
            SELECT * FROM (
                SELECT DISTINCT ON (coalesce(ev.commit_hash, ev.id::text))
                       ev.id AS evaluation_id, ev.commit_hash, ev.pr_number,
                       ev.pr_head_branch, ev.pr_base_branch
                FROM evaluations ev
                WHERE ev.id = b.evaluation_id OR ev.id IN (
                    SELECT eb.evaluation_id FROM evaluation_builds eb
                    WHERE eb.build_id = b.id)
                ORDER BY coalesce(ev.commit_hash, ev.id::text), ev.id DESC
            ) per_commit ORDER BY evaluation_id DESC LIMIT :fan_out
        ) e ON true
        WHERE b.id = ANY(:ids)
        ORDER BY b.id, e.evaluation_id
    """), {"ids": ids, "fan_out": COMMITS_PER_BUILD}).mappings().all()
    return [dict(row) for row in rows]


def _outputs_of(session: Session, ids: list[int]) -> dict[int, dict[str, str]]:
    outputs: dict[int, dict[str, str]] = {}
    for build_id, name, path in session.execute(text(
            "SELECT build_id, name, path FROM build_outputs WHERE build_id = ANY(:ids)"),
            {"ids": ids}).all():
        outputs.setdefault(build_id, {})[name] = path
    return outputs


def _tasks(settings: Settings, rows: list[dict[str, Any]], outputs: dict[int, dict[str, str]],
           configs: dict[int, list[NotificationConfig]]) -> list[dict[str, Any]]:
    """notification_tasks rows: one per event and config whose filters and target want it."""
    now = utcnow()
    tasks: list[dict[str, Any]] = []
    for row in rows:
        status = BuildStatus(row["status"])
        event = Event.of(status)
        payload = build_payload(settings, row, outputs.get(row["id"], {}), event, now)
        for config in configs[row["project_id"]]:
            target = TARGETS[config.type]
            if not _job_matches(config.config, row["job_name"]) or \
                    not _event_wanted(config.config, event):
                continue
            if not target.wants(settings, config.config, event, status):
                continue
            tasks.append({
                "type": config.type, "payload": payload, "build_id": row["id"],
                "config_id": config.id, "max_attempts": settings.notifications.max_attempts,
                "status": NotificationTaskStatus.pending,
                # collect_events enqueues its delivery; the scan only re-sends lost messages
                "next_retry_at": now + timedelta(seconds=REDELIVER_SECS),
            })
    return tasks


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def build_payload(settings: Settings, row: Mapping[str, Any], outputs: Mapping[str, str],
                  event: Event, at: datetime) -> dict[str, Any]:
    """The event snapshot every target renders (and the generic webhook's body)."""
    status = BuildStatus(row["status"])
    pull_request = None
    if row["pr_number"] is not None:
        pull_request = {"number": row["pr_number"], "head_branch": row["pr_head_branch"],
                        "base_branch": row["pr_base_branch"]}
    return {
        "event": event.value,
        "at": at.isoformat(),
        "project": row["project"],
        "project_id": row["project_id"],
        "jobset": row["jobset"],
        "jobset_id": row["jobset_id"],
        "evaluation_id": row["evaluation_id"],
        "commit": row["commit_hash"],
        "repository_url": row["repository_url"] or None,
        "pull_request": pull_request,
        "build": {
            "id": row["id"],
            "job_name": row["job_name"],
            "status": status.name,
            "status_code": int(status),
            "finished": status.is_finished,
            "success": status is BuildStatus.succeeded,
            "system": row["system"],
            "drv_path": row["drv_path"],
            "outputs": dict(outputs),
            "is_aggregate": bool(row["is_aggregate"]),
            "started_at": _iso(row["started_at"]),
            "completed_at": _iso(row["completed_at"]),
            "error_message": row["error_message"],
            "url": f"{base_url(settings)}/build/{row['id']}",
        },
    }


# ---------------------------------------------------------------------------
# delivery


def backoff_secs(settings: Settings, attempts: int) -> int:
    """Delay after the ``attempts``-th failed attempt: base · 2^(attempts-1), capped."""
    config = settings.notifications
    return int(min(config.retry_base_secs * 2 ** max(0, attempts - 1), config.retry_max_secs))


def _sibling_lock(session: Session, build_id: int, config_id: int) -> None:
    # serialises the "newer/older sibling" checks of one (build, config) pair
    digest = hashlib.blake2b(f"notify:{build_id}:{config_id}".encode(), digest_size=8).digest()
    session.execute(text("SELECT pg_advisory_xact_lock(:key)"),
                    {"key": int.from_bytes(digest, "big", signed=True)})


def _finish(task: NotificationTask, status: NotificationTaskStatus, error: str | None) -> None:
    task.status = status
    task.last_error = error
    task.next_retry_at = None
    task.completed_at = utcnow()


def deliver(session: Session, settings: Settings, task_id: int, attempt: int | None = None
            ) -> str:
    """Deliver one task (commits: the claim before sending, the outcome after).

    ``attempt``: the number of attempts the sender saw; a message for an attempt
    already made is stale and ignored. Returns what happened (for logs/tests).
    """
    task = session.scalar(select(NotificationTask).where(NotificationTask.id == task_id)
                          .with_for_update(skip_locked=True))
    if task is None:
        session.rollback()
        return "busy-or-gone"
    if task.status is not NotificationTaskStatus.pending or (
            attempt is not None and task.attempts != attempt):
        session.rollback()
        return "stale"
    config = session.get(NotificationConfig, task.config_id) if task.config_id else None
    if config is None or not config.enabled:
        _finish(task, NotificationTaskStatus.failed,
                "the notification config was deleted" if config is None
                else "the notification config is disabled")
        session.commit()
        return "failed"
    target = TARGETS[task.type]
    now = utcnow()
    if target.supersedes and task.build_id is not None:
        _sibling_lock(session, task.build_id, config.id)
        # statuses of one build on one commit replace each other; other commits' do not
        commit = task.payload.get("commit")
        same_commit = NotificationTask.payload["commit"].as_string()
        siblings = select(NotificationTask.id).where(
            NotificationTask.build_id == task.build_id, NotificationTask.config_id == config.id,
            same_commit.is_(None) if commit is None else same_commit == commit)
        newer = session.scalar(siblings.where(NotificationTask.id > task.id)
                               .order_by(NotificationTask.id.desc()).limit(1))
        if newer is not None:
            _finish(task, NotificationTaskStatus.completed,
                    f"skipped: superseded by task {newer}")
            session.commit()
            return "superseded"
        in_flight = session.scalar(siblings.where(
            NotificationTask.id < task.id,
            NotificationTask.status == NotificationTaskStatus.running,
            NotificationTask.next_retry_at > now).limit(1))
        if in_flight is not None:
            task.next_retry_at = now + timedelta(seconds=DEFER_SECS)
            session.commit()
            return "deferred"
    task.status = NotificationTaskStatus.running
    task.attempts += 1
    task.next_retry_at = now + timedelta(seconds=LEASE_SECS)
    claimed, kind = task.attempts, task.type.value
    delivery = Delivery(settings, dict(config.config), dict(task.payload),
                        files_allowed=config.managed_declaratively)
    session.commit()

    error: DeliveryError | None = None
    try:
        target.deliver(delivery)
    except DeliveryError as exc:
        error = exc
    except RepositoryUrlError as exc:  # "owner/name" expected: retrying cannot help
        error = DeliveryError(str(exc), permanent=True)
    except Exception as exc:
        # a bug in a target must not lose the task: it is retried like a network error
        log.exception("notification task %d (%s): delivery raised", task_id, kind)
        error = DeliveryError(f"internal error: {type(exc).__name__}: {exc}"[:500])
    return _record(session, settings, task_id, claimed, error)


def _record(session: Session, settings: Settings, task_id: int, claimed: int,
            error: DeliveryError | None) -> str:
    task = session.scalar(select(NotificationTask).where(NotificationTask.id == task_id)
                          .with_for_update())
    if task is None or task.status is not NotificationTaskStatus.running or \
            task.attempts != claimed:
        # taken away meanwhile (admin retry of a "stuck" task, lease recovery)
        session.rollback()
        return "lost"
    if error is None:
        _finish(task, NotificationTaskStatus.completed, None)
        outcome = "completed"
    elif error.permanent or task.attempts >= task.max_attempts:
        _finish(task, NotificationTaskStatus.failed, str(error))
        outcome = "failed"
        log.warning("notification task %d (%s) failed after %d attempt(s): %s", task.id,
                    task.type.value, task.attempts, error)
    else:
        task.status = NotificationTaskStatus.pending
        task.last_error = str(error)
        delay = backoff_secs(settings, task.attempts)
        task.next_retry_at = utcnow() + timedelta(seconds=delay)
        outcome = "retry"
        log.info("notification task %d (%s) attempt %d failed, retrying in %d s: %s",
                 task.id, task.type.value, task.attempts, delay, error)
    session.commit()
    return outcome


# ---------------------------------------------------------------------------
# the scan, the admin retry, retention


def retry_due(session: Session, settings: Settings, *, limit: int = 1000) -> list[int]:
    """Enqueue pending tasks that are due; recover deliveries whose worker died.

    Caller commits (the messages are sent after commit).
    """
    session.execute(text("""
        UPDATE notification_tasks SET
            status = CASE WHEN attempts >= max_attempts THEN 'failed' ELSE 'pending' END,
            completed_at = CASE WHEN attempts >= max_attempts THEN now() END,
            next_retry_at = CASE WHEN attempts >= max_attempts THEN NULL ELSE now() END,
            last_error = 'the delivery did not finish (worker lost?)'
        WHERE status = 'running' AND next_retry_at < now()
    """))
    due = session.execute(text("""
        WITH due AS (
            SELECT id FROM notification_tasks
            WHERE status = 'pending' AND (next_retry_at <= now() OR next_retry_at IS NULL)
            ORDER BY next_retry_at NULLS FIRST LIMIT :limit
            FOR UPDATE SKIP LOCKED
        )
        UPDATE notification_tasks AS t
        SET next_retry_at = now() + make_interval(secs => :redeliver)
        FROM due WHERE t.id = due.id
        RETURNING t.id, t.attempts
    """), {"limit": limit, "redeliver": REDELIVER_SECS}).all()
    for task_id, attempts in sorted(due):
        enqueue(session, DELIVER_TASK, task_id, attempts, queue=celeryconfig.NOTIFY_QUEUE)
    return sorted(task_id for task_id, _ in due)


def retry(session: Session, actor: Actor, task_id: int) -> NotificationTask:
    """Put a failed (or stuck) task back to pending with a fresh attempt budget and
    deliver it right after commit (caller commits)."""
    require_permission(session, actor, Action.admin_access)
    task = session.get(NotificationTask, task_id, with_for_update=True)
    if task is None:
        raise NotFound(f"no notification task {task_id}")
    if task.status is NotificationTaskStatus.completed:
        raise Conflict("the task already completed")
    task.status = NotificationTaskStatus.pending
    task.attempts = 0
    task.next_retry_at = utcnow()
    task.last_error = None
    task.completed_at = None
    audit.record(session, actor, "notification_task.retry", f"notification_task:{task_id}")
    enqueue(session, DELIVER_TASK, task_id, 0, queue=celeryconfig.NOTIFY_QUEUE)
    return task


def cleanup(session: Session, settings: Settings) -> int:
    """Delete completed and failed tasks older than ``retention_days`` (caller commits)."""
    result = session.execute(text("""
        DELETE FROM notification_tasks
        WHERE status IN ('completed', 'failed')
          AND COALESCE(completed_at, created_at) < now() - make_interval(days => :days)
    """), {"days": settings.notifications.retention_days})
    return int(result.rowcount or 0)  # type: ignore[attr-defined]

