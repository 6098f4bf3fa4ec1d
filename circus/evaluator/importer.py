"""Turn an evaluation's jobs into builds, in bulk.

Everything is written with PostgreSQL ``COPY`` inside the caller's transaction:
ids are drawn from the sequence in one statement first, so outputs, memberships,
aggregate links and dependency edges are copied without reading anything back.
A 50,000-job evaluation is a handful of statements, never one flush per job.

Reuse (Hydra semantics): a job whose derivation equals the one of the same job in
the previous evaluation of the jobset links to that build (``evaluation_builds``
with ``is_new = false``) instead of queueing a duplicate, unless the jobset is in
``interval`` mode, which asks for fresh builds every time.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from circus.common.enums import EvaluationStatus
from circus.common.models import Evaluation, Jobset
from circus.evaluator.jobs import Job, JobError

NOTIFY_CHANNEL = "circus_builds"


@dataclass
class ImportStats:
    new: int
    reused: int
    errors: int


# ---------------------------------------------------------------------------
# COPY text format


def _text(value: str) -> str:
    return (value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")
            .replace("\r", "\\r").replace("\x00", ""))


def _cell(value: Any) -> str:
    if value is None:
        return "\\N"
    if value is True:
        return "t"
    if value is False:
        return "f"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return _text(_array(value))
    return _text(str(value))


def _array(items: Sequence[str]) -> str:
    quoted = ('"' + str(i).replace("\\", "\\\\").replace('"', '\\"') + '"' for i in items)
    return "{" + ",".join(quoted) + "}"


def _copy(session: Session, table: str, columns: Sequence[str],
          rows: Iterable[Sequence[Any]]) -> int:
    buffer = io.StringIO()
    count = 0
    for row in rows:
        buffer.write("\t".join(_cell(v) for v in row))
        buffer.write("\n")
        count += 1
    if not count:
        return 0
    buffer.seek(0)
    # psycopg2's COPY on the session's own connection: same transaction
    raw: Any = session.connection().connection.dbapi_connection
    with raw.cursor() as cursor:
        cursor.copy_expert(f"COPY {table} ({', '.join(columns)}) FROM STDIN", buffer)
    return count


# ---------------------------------------------------------------------------
# meta


def _license(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        for key in ("spdxId", "shortName", "fullName"):
            if isinstance(value.get(key), str):
                return str(value[key])
        return None
    if isinstance(value, list):
        names = [n for n in (_license(v) for v in value) if n]
        return ", ".join(names) or None
    return None


def _maintainers(value: Any) -> str | None:
    if not isinstance(value, list):
        value = [value] if value else []
    names = []
    for item in value:
        if isinstance(item, str):
            names.append(item)
        elif isinstance(item, dict):
            for key in ("name", "github", "email"):
                if isinstance(item.get(key), str):
                    names.append(str(item[key]))
                    break
    return ", ".join(names) or None


def _homepage(value: Any) -> str | None:
    if isinstance(value, list):
        value = next((v for v in value if isinstance(v, str)), None)
    return value if isinstance(value, str) else None


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return None


def _description(value: Any) -> str | None:
    return value if isinstance(value, str) else None


# ---------------------------------------------------------------------------


def previous_evaluation(session: Session, evaluation: Evaluation) -> int | None:
    """The evaluation whose builds this one may reuse: the jobset's last completed
    one of the same kind (same pull request, or none); a pull request's first
    evaluation reuses from the branch's last one."""
    base = (select(Evaluation.id)
            .where(Evaluation.jobset_id == evaluation.jobset_id,
                   Evaluation.id != evaluation.id,
                   Evaluation.status == EvaluationStatus.completed)
            .order_by(Evaluation.id.desc()).limit(1))
    same = session.scalar(base.where(
        Evaluation.pr_number.is_(None) if evaluation.pr_number is None
        else Evaluation.pr_number == evaluation.pr_number))
    if same is None and evaluation.pr_number is not None:
        same = session.scalar(base.where(Evaluation.pr_number.is_(None)))
    return same


def _allocate_ids(session: Session, count: int) -> list[int]:
    if not count:
        return []
    rows = session.execute(
        text("SELECT nextval(pg_get_serial_sequence('builds', 'id')) "
             "FROM generate_series(1, :n)"), {"n": count})
    return [int(r[0]) for r in rows]


def import_jobs(session: Session, evaluation: Evaluation, jobset: Jobset, jobs: list[Job],
                errors: list[JobError], *, reuse: bool, max_retries: int) -> ImportStats:
    """Insert builds, outputs, memberships, links and errors; NOTIFY the queue runner."""
    previous: dict[str, tuple[int, str]] = {}
    if reuse:
        prev_id = previous_evaluation(session, evaluation)
        if prev_id is not None:
            rows = session.execute(text(
                "SELECT b.job_name, b.id, b.drv_path FROM evaluation_builds eb "
                "JOIN builds b ON b.id = eb.build_id WHERE eb.evaluation_id = :e"),
                {"e": prev_id})
            previous = {name: (build_id, drv) for name, build_id, drv in rows}

    new_jobs: list[Job] = []
    reused: list[tuple[Job, int]] = []
    for job in jobs:
        old = previous.get(job.name)
        if old is not None and old[1] == job.drv_path:
            reused.append((job, old[0]))
        else:
            new_jobs.append(job)

    ids = _allocate_ids(session, len(new_jobs))
    build_of_job: dict[str, int] = {job.name: build_id for job, build_id in reused}
    build_of_job.update({job.name: build_id for job, build_id in zip(new_jobs, ids,
                                                                      strict=True)})
    build_of_drv: dict[str, int] = {}
    for job in jobs:
        build_of_drv.setdefault(job.drv_path, build_of_job[job.name])

    eval_id, jobset_id, project_id = evaluation.id, jobset.id, jobset.project_id

    def build_rows() -> Iterable[Sequence[Any]]:
        for job, build_id in zip(new_jobs, ids, strict=True):
            meta = job.meta
            yield (build_id, eval_id, jobset_id, project_id, job.name, job.drv_path,
                   job.system, _int(meta.get("schedulingPriority")) or 0, max_retries,
                   job.is_aggregate, job.is_fod, job.features, job.nix_name or None,
                   _description(meta.get("description")), _license(meta.get("license")),
                   _homepage(meta.get("homepage")), _maintainers(meta.get("maintainers")),
                   _int(meta.get("timeout")), _int(meta.get("maxSilent")))

    _copy(session, "builds",
          ("id", "evaluation_id", "jobset_id", "project_id", "job_name", "drv_path",
           "system", "priority", "max_retries", "is_aggregate", "is_fod",
           "required_features", "nix_name", "meta_description", "meta_license",
           "meta_homepage", "meta_maintainers", "timeout", "max_silent"),
          build_rows())
    _copy(session, "build_outputs", ("build_id", "name", "path"),
          ((build_id, name, path)
           for job, build_id in zip(new_jobs, ids, strict=True)
           for name, path in sorted(job.outputs.items())))
    _copy(session, "evaluation_builds", ("evaluation_id", "build_id", "is_new"),
          [(eval_id, build_id, True) for build_id in ids]
          + [(eval_id, build_id, False) for _, build_id in reused])

    def constituent_rows() -> Iterable[tuple[int, int]]:
        for job, build_id in zip(new_jobs, ids, strict=True):
            if not job.is_aggregate:
                continue
            members = {build_of_drv[d] for d in job.constituents if d in build_of_drv}
            members |= {build_of_job[n] for n in job.named_constituents if n in build_of_job}
            members.discard(build_id)
            for member in sorted(members):
                yield build_id, member

    _copy(session, "build_constituents", ("aggregate_id", "constituent_id"),
          constituent_rows())

    def dependency_rows() -> Iterable[tuple[int, int]]:
        for job, build_id in zip(new_jobs, ids, strict=True):
            if job.facts is None or not job.facts.input_drvs:
                continue
            deps = {build_of_drv[d] for d in job.facts.input_drvs if d in build_of_drv}
            deps.discard(build_id)
            for dep in sorted(deps):
                yield build_id, dep

    _copy(session, "build_dependencies", ("build_id", "dependency_id"), dependency_rows())
    _copy(session, "evaluation_errors", ("evaluation_id", "job_name", "message"),
          ((eval_id, error.name, error.message) for error in errors))
    # the queue runner LISTENs here; the notification is delivered on commit
    session.execute(text("SELECT pg_notify(:channel, :payload)"),
                    {"channel": NOTIFY_CHANNEL, "payload": str(eval_id)})
    return ImportStats(new=len(new_jobs), reused=len(reused), errors=len(errors))
