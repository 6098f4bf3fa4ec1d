"""Builds of evaluations by status: counted once an evaluation has settled, then stored.

An evaluation holds thousands of builds (its ``evaluation_builds``), and lists show
the counts of dozens of evaluations: counting them on every page cost a hash of all
builds. Once an evaluation and every build in it have finished the counts no longer
change, so the first reader stores them on the evaluation (``status_counts``) and
later ones read one column. A finished build that changes status again (a restart)
resets the stored counts of every evaluation holding it, in a trigger (see the
migration ``5d2b8e4f1a90``), so no write path of builds has to remember them.
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

FINISHED_EVALUATIONS = tuple(s.value for s in EvaluationStatus if s.is_finished)

# After the row locks, in a statement of its own (a snapshot taken after the locks): a
# restart holds the same row lock (its trigger updates the row) until it commits, so
# the counts are either stored before it, and reset by it, or counted after it.
_STORE = text(f"""
    UPDATE evaluations e SET status_counts = c.counts
    FROM (SELECT evaluation_id, jsonb_object_agg(status, n) AS counts
          FROM (SELECT eb.evaluation_id, b.status, count(*) AS n FROM evaluation_builds eb
                JOIN builds b ON b.id = eb.build_id WHERE eb.evaluation_id = ANY(:ids)
                GROUP BY eb.evaluation_id, b.status) AS by_status
          GROUP BY evaluation_id) AS c
    WHERE e.id = c.evaluation_id AND e.status_counts IS NULL
      AND e.status::text = ANY(:finished)
      AND NOT EXISTS (SELECT 1 FROM evaluation_builds eb JOIN builds b ON b.id = eb.build_id
                      WHERE eb.evaluation_id = e.id AND b.status IN {UNFINISHED})
""")


def status_counts(session: Session, evaluation_ids: Iterable[int]
                  ) -> dict[int, dict[str, int]]:
    """Builds of each evaluation by status name: stored counts where there are, one
    grouped query for the rest (whose settled ones are then stored)."""
    ids = list(evaluation_ids)
    counts: dict[int, dict[str, int]] = defaultdict(dict)
    if not ids:
        return counts
    missing = []
    finished = set()
    for eid, stored, status in session.execute(
            select(Evaluation.id, Evaluation.status_counts, Evaluation.status)
            .where(Evaluation.id.in_(ids))):
        if stored is not None:
            counts[eid] = _named(stored)
        else:
            missing.append(eid)
            if status.is_finished:
                finished.add(eid)
    if not missing:
        return counts
    rows = session.execute(
        select(EvaluationBuild.evaluation_id, Build.status, func.count())
        .join(Build, Build.id == EvaluationBuild.build_id)
        .where(EvaluationBuild.evaluation_id.in_(missing))
        .group_by(EvaluationBuild.evaluation_id, Build.status))
    for eid, status, count in rows:
        counts[eid][status.name] = count
    settled = [eid for eid in missing if eid in finished and counts[eid] and not (
        counts[eid].keys() & {BuildStatus.pending.name, BuildStatus.running.name})]
    if settled:
        store(session, settled)
    return counts


def store(session: Session, evaluation_ids: list[int]) -> None:
    """Store the counts of settled evaluations, in a short transaction of its own.

    Not in the caller's (a read request's, rolled back at its end); an evaluation
    whose row another transaction holds (a restart of one of its builds) is skipped,
    never waited for: a later reader stores it. Two statements, however many.
    """
    with session.get_bind().engine.connect() as connection:
        locked = list(connection.execute(
            select(Evaluation.id).where(Evaluation.id.in_(evaluation_ids),
                                        Evaluation.status_counts.is_(None))
            .order_by(Evaluation.id).with_for_update(skip_locked=True)).scalars())
        if locked:
            connection.execute(_STORE, {"ids": locked, "finished": list(FINISHED_EVALUATIONS)})
        connection.commit()


def _named(stored: dict[str, Any]) -> dict[str, int]:
    return {BuildStatus(int(code)).name: int(n) for code, n in stored.items()}
