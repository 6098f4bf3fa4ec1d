"""Channels that follow their jobset: the automatic advance and its settings.

A channel in ``automatic`` mode moves by itself to the newest evaluation of its
jobset that is good: completed without evaluation errors and with every build
succeeded, or, when the channel names an ``aggregate_job``, with that job's
build succeeded (Hydra's release aggregates). :func:`advance_channels` is
called where that can become true (a build finished, an evaluation completed);
it is idempotent and never moves a channel to an older evaluation.

Kept apart from :mod:`circus.projects.service` so the queue runner and the
evaluator can call it without importing the whole project service.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from circus import audit
from circus.auth.actor import Actor
from circus.common.enums import BuildStatus, ChannelMode, EvaluationStatus
from circus.common.errors import InvalidInput
from circus.common.models import Channel

#: the audit actor of automatic moves
ACTOR_NAME = "channels"
JOB_NAME_RE = re.compile(r"^[^\s\x00-\x1f\x7f]{1,255}$")


def check_settings(mode: Any, aggregate_job: Any) -> tuple[ChannelMode, str | None]:
    """Validated ``(mode, aggregate_job)``; InvalidInput naming the bad field."""
    problems: dict[str, list[str]] = {}
    try:
        parsed = ChannelMode(mode)
    except ValueError:
        parsed = ChannelMode.manual
        problems["mode"] = [f"one of {', '.join(m.value for m in ChannelMode)}"]
    if aggregate_job is not None and (not isinstance(aggregate_job, str)
                                      or not JOB_NAME_RE.match(aggregate_job)):
        problems["aggregate_job"] = ["a job name: 1 to 255 characters, no whitespace"]
    if problems:
        raise InvalidInput("invalid channel settings", problems)
    return parsed, aggregate_job


def newest_good_evaluation(session: Session, channel: Channel) -> int | None:
    """The newest good evaluation of the channel's jobset newer than its current one."""
    if channel.aggregate_job is None:
        condition = """
            EXISTS (SELECT 1 FROM evaluation_builds eb WHERE eb.evaluation_id = e.id)
            AND NOT EXISTS (SELECT 1 FROM evaluation_builds eb JOIN builds b ON b.id = eb.build_id
                            WHERE eb.evaluation_id = e.id AND b.status <> :succeeded)
            AND NOT EXISTS (SELECT 1 FROM evaluation_errors ee WHERE ee.evaluation_id = e.id)"""
    else:
        condition = """
            EXISTS (SELECT 1 FROM evaluation_builds eb JOIN builds b ON b.id = eb.build_id
                    WHERE eb.evaluation_id = e.id AND b.job_name = :job
                      AND b.status = :succeeded)"""
    found = session.scalar(text(f"""
        SELECT e.id FROM evaluations e
        WHERE e.jobset_id = :jobset AND e.status = :completed AND NOT e.hidden
          AND e.id > :current AND {condition}
        ORDER BY e.id DESC LIMIT 1
    """), {"jobset": channel.jobset_id, "completed": EvaluationStatus.completed.value,
           "current": channel.evaluation_id or 0, "succeeded": int(BuildStatus.succeeded),
           "job": channel.aggregate_job})
    return None if found is None else int(found)


def advance_channels(session: Session, jobset_id: int) -> list[Channel]:
    """Move the jobset's automatic channels to its newest good evaluation; the moved ones.

    Runs in the caller's transaction (the caller commits). The channel rows are
    locked, so concurrent calls serialise; a channel only ever moves forward.
    """
    channels = session.scalars(
        select(Channel).where(Channel.jobset_id == jobset_id,
                              Channel.mode == ChannelMode.automatic)
        .order_by(Channel.id).with_for_update()).all()
    moved = []
    for channel in channels:
        target = newest_good_evaluation(session, channel)
        if target is None:
            continue
        previous = channel.evaluation_id
        channel.evaluation_id = target
        channel.moved_at = datetime.now(UTC)
        audit.record(session, Actor.system(ACTOR_NAME), "channel.advance",
                     f"channel:{channel.name}",
                     {"evaluation_id": target, "previous_evaluation_id": previous,
                      "aggregate_job": channel.aggregate_job})
        moved.append(channel)
    return moved


def advance_channels_of_builds(session: Session, build_ids: list[int]) -> None:
    """:func:`advance_channels` for every jobset with an automatic channel that one of
    ``build_ids`` belongs to (through any evaluation that links it)."""
    if not build_ids:
        return
    jobsets = session.execute(text("""
        SELECT DISTINCT c.jobset_id FROM channels c
        WHERE c.mode = 'automatic' AND EXISTS (
            SELECT 1 FROM evaluation_builds eb JOIN evaluations e ON e.id = eb.evaluation_id
            WHERE eb.build_id = ANY(:ids) AND e.jobset_id = c.jobset_id)
        ORDER BY c.jobset_id
    """), {"ids": build_ids}).scalars().all()
    for jobset_id in jobsets:
        advance_channels(session, jobset_id)
