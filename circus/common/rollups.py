"""Merging the rollups of the builds (``build_status_totals``, ``build_completion_hours``,
``project_completion_hours``, ``build_id_blocks``) and of the evaluations
(``evaluation_totals``).

Triggers on builds append delta rows (migration ``b7d2e4f1a9c3``): every statement
that inserts, deletes or changes the status or times of builds adds, per key it
touched, one row with the change. Readers sum all rows of their keys, so the figures
are right whether merged or not; merging keeps the tables at about one row per key
(a few thousand for the totals, one per key and hour for the time series) where every
finished build would otherwise leave two or three rows.

Merging deletes the unmerged rows' keys and inserts their sums in one statement. A
delta committed after that statement's snapshot is neither deleted nor summed (it
stays for the next merge), so nothing is counted twice or lost; the advisory lock
only keeps two mergers from doing the same work.
"""

from __future__ import annotations

from sqlalchemy import func, select, text
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from circus.common.models.builds import BUILD_ID_BLOCK

#: pg_try_advisory_xact_lock key of the merge ("CRLU")
MERGE_LOCK = 0x43524C55

_KEYS = {
    "build_status_totals": ("project_id", "jobset_id", "system", "status"),
    "build_completion_hours": ("project_id", "jobset_id", "status", "hour"),
    "project_completion_hours": ("project_id", "status", "hour"),
    "build_id_blocks": ("project_id", "block"),
    "evaluation_totals": ("jobset_id", "status", "trigger_kind"),
}
_DURATIONS = ("builds", "duration_sum", "durations")
#: the summed columns of each rollup
_SUMS = {**dict.fromkeys(_KEYS, _DURATIONS), "build_id_blocks": ("builds",),
         "evaluation_totals": ("evaluations",)}


def compact(session: Session) -> int:
    """Merge the delta rows of the rollups, unless another session is at it; returns
    the number of rows removed."""
    if not session.scalar(select(func.pg_try_advisory_xact_lock(MERGE_LOCK))):
        return 0
    removed = 0
    for table, key in _KEYS.items():
        columns = ", ".join(key)
        match = " AND ".join(f"t.{c} = f.{c}" for c in key)
        summed = ", ".join(_SUMS[table])
        sums = ", ".join(f"sum({c})" for c in _SUMS[table])
        zeros = ", ".join("0" for _ in _SUMS[table])
        before = session.scalar(text(f"SELECT count(*) FROM {table} WHERE NOT merged"))
        if not before:
            continue
        inserted = session.execute(text(f"""
            WITH fresh AS (SELECT DISTINCT {columns} FROM {table} WHERE NOT merged),
            gone AS (DELETE FROM {table} t USING fresh f WHERE {match} RETURNING t.*),
            sums AS (
                INSERT INTO {table} ({columns}, {summed}, merged)
                SELECT {columns}, {sums}, true
                FROM gone GROUP BY {columns}
                HAVING ROW({sums}) <> ROW({zeros})
                RETURNING 1)
            SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM sums)""")).one()
        removed += inserted[0] - inserted[1]
    return removed


def rebuild(connection: Connection | Session) -> None:
    """Recompute the rollups from the builds and evaluations (merged rows), for rows
    written with the triggers off (``session_replication_role = replica``: a bulk load,
    a restore by hand). Lock builds and evaluations against writers first, or run it
    where there are none."""
    seconds = "extract(epoch FROM completed_at - started_at)"
    sums = f"count(*), coalesce(sum({seconds}), 0), count({seconds}), true"
    hour = "date_trunc('hour', completed_at, 'UTC')"
    for table in _KEYS:
        connection.execute(text(f"DELETE FROM {table}"))
    connection.execute(text(f"""
        INSERT INTO build_status_totals (project_id, jobset_id, system, status, builds,
                                         duration_sum, durations, merged)
        SELECT project_id, jobset_id, system, status, {sums}
        FROM builds GROUP BY project_id, jobset_id, system, status"""))
    for table, key in (("build_completion_hours", "project_id, jobset_id, status"),
                       ("project_completion_hours", "project_id, status")):
        connection.execute(text(f"""
            INSERT INTO {table} ({key}, hour, builds, duration_sum, durations, merged)
            SELECT {key}, {hour}, {sums}
            FROM builds WHERE completed_at IS NOT NULL GROUP BY {key}, {hour}"""))
    connection.execute(text(f"""
        INSERT INTO build_id_blocks (project_id, block, builds, merged)
        SELECT project_id, id / {BUILD_ID_BLOCK}, count(*), true
        FROM builds GROUP BY project_id, id / {BUILD_ID_BLOCK}"""))
    connection.execute(text("""
        INSERT INTO evaluation_totals (jobset_id, status, trigger_kind, evaluations, merged)
        SELECT jobset_id, status, trigger_kind, count(*), true
        FROM evaluations GROUP BY jobset_id, status, trigger_kind"""))
