"""Builds of evaluations by status, without counting thousands of builds per list.

An evaluation holds thousands of builds (its ``evaluation_builds``), and lists show
the counts of dozens of evaluations: counting them on every page cost a hash join
over all builds. Once an evaluation has finished (its membership is complete), the
first reader stores on it the counts of its *finished* builds, which change no more,
and the ids of the builds still unfinished (``status_counts``,
``unfinished_build_ids``). Later readers add the live status of those few builds to
the stored counts; when half of them have finished since, the next reader stores
again (so the list shrinks and, once everything has finished, is empty).

A finished build that changes status again (a restart) resets what is stored for
every evaluation holding it, in a trigger (migration ``5d2b8e4f1a90``), so no write
path of builds has to know about any of this.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from circus.common.enums import BuildStatus, EvaluationStatus
from circus.common.models import Build, Evaluation, EvaluationBuild
from circus.common.statussql import UNFINISHED

FINISHED_EVALUATIONS = [s.value for s in EvaluationStatus if s.is_finished]

# After the row locks, in a statement of its own (a snapshot taken after the locks): a
# restart holds the same row lock (its trigger updates the row) until it commits, so
# what is stored is either stored before it, and reset by it, or read after it.
_STORE = text(f"""
    WITH members AS (
        SELECT eb.evaluation_id, b.id, b.status FROM evaluation_builds eb
        JOIN builds b ON b.id = eb.build_id WHERE eb.evaluation_id = ANY(:ids)
    ), finished AS (
        SELECT evaluation_id, jsonb_object_agg(status, n) AS counts
        FROM (SELECT evaluation_id, status, count(*) AS n FROM members
              WHERE status NOT IN {UNFINISHED} GROUP BY evaluation_id, status) AS by_status
        GROUP BY evaluation_id
    ), unfinished AS (
        SELECT evaluation_id, array_agg(id ORDER BY id) AS ids FROM members
        WHERE status IN {UNFINISHED} GROUP BY evaluation_id
    )
    UPDATE evaluations e
    SET status_counts = coalesce(f.counts, '{{}}'), unfinished_build_ids = coalesce(u.ids, '{{}}')
    FROM unnest(CAST(:ids AS bigint[])) AS i(id)
    LEFT JOIN finished f ON f.evaluation_id = i.id LEFT JOIN unfinished u ON u.evaluation_id = i.id
    WHERE e.id = i.id AND e.status::text = ANY(:finished)
""")


def status_counts(session: Session, evaluation_ids: Iterable[int]
                  ) -> dict[int, dict[str, int]]:
    """Builds of each evaluation by status name (at most four statements)."""
    ids = list(evaluation_ids)
    if not ids:
        return defaultdict(dict)
    return _counts(session, session.execute(
        select(Evaluation.id, Evaluation.status_counts, Evaluation.unfinished_build_ids,
               Evaluation.status).where(Evaluation.id.in_(ids))).tuples())


def loaded_status_counts(session: Session, evaluations: Iterable[Evaluation]
                         ) -> dict[int, dict[str, int]]:
    """:func:`status_counts` of evaluations just loaded, from what was read with them
    (a page listing them saves the statement reading it again)."""
    return _counts(session, [(e.id, e.status_counts, e.unfinished_build_ids, e.status)
                             for e in evaluations])


def _counts(session: Session, stored_rows: Iterable[tuple[int, dict[str, Any] | None,
                                                          list[int] | None, EvaluationStatus]]
            ) -> dict[int, dict[str, int]]:
    counts: dict[int, dict[str, int]] = defaultdict(dict)
    missing, finished = [], set()
    pending: dict[int, int] = {}
    for eid, stored, unfinished, status in stored_rows:
        if stored is None:
            missing.append(eid)
            if status.is_finished:
                finished.add(eid)
            continue
        counts[eid] = _named(stored)
        if unfinished:
            pending[eid] = len(unfinished)
    done_since: dict[int, int] = defaultdict(int)
    if pending:
        # the builds unfinished when the counts were stored, by their status now
        live = text("""
            SELECT e.id, b.status, count(*) FROM evaluations e
            CROSS JOIN LATERAL unnest(e.unfinished_build_ids) AS u(build_id)
            JOIN builds b ON b.id = u.build_id
            WHERE e.id = ANY(:ids) GROUP BY e.id, b.status""")
        for eid, code, count in session.execute(live, {"ids": list(pending)}):
            build_status = BuildStatus(code)
            counts[eid][build_status.name] = counts[eid].get(build_status.name, 0) + count
            if build_status.is_finished:
                done_since[eid] += count
    if missing:
        for eid, build_status, count in session.execute(
                select(EvaluationBuild.evaluation_id, Build.status, func.count())
                .join(Build, Build.id == EvaluationBuild.build_id)
                .where(EvaluationBuild.evaluation_id.in_(missing))
                .group_by(EvaluationBuild.evaluation_id, Build.status)):
            counts[eid][build_status.name] = count
    stale = [eid for eid, n in pending.items() if done_since[eid] * 2 >= n]
    if finished or stale:
        store(session, [*finished, *stale])
    return counts


def store(session: Session, evaluation_ids: list[int]) -> None:
    """Store (again) what ``status_counts`` reads, in a short transaction of its own.

    Not in the caller's (a read request's, rolled back at its end). An evaluation
    whose row another transaction holds (a restart of one of its builds) is skipped,
    never waited for: a later reader stores it. Two statements, however many.
    """
    with session.get_bind().engine.connect() as connection:
        locked = list(connection.execute(
            select(Evaluation.id).where(Evaluation.id.in_(evaluation_ids))
            .order_by(Evaluation.id).with_for_update(skip_locked=True)).scalars())
        if locked:
            connection.execute(_STORE, {"ids": locked, "finished": FINISHED_EVALUATIONS})
        connection.commit()


def _named(stored: dict[str, Any]) -> dict[str, int]:
    return {BuildStatus(int(code)).name: int(n) for code, n in stored.items()}
