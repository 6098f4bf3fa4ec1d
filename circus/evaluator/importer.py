"""Turn an evaluation's jobs into builds, in bulk.

Everything is written with PostgreSQL ``COPY`` inside the caller's transaction:
ids are drawn from the sequence in one statement first, so outputs, memberships,
aggregate links and dependency edges are copied without reading anything back.
A 50,000-job evaluation is a handful of statements, never one flush per job.

Reuse (Hydra semantics): a job whose derivation equals the one of the same job in
the previous evaluation of the jobset links to that build (``evaluation_builds``
with ``is_new = false``) instead of queueing a duplicate, unless the jobset is in
``interval`` mode, which asks for fresh builds every time, or the old build was
cancelled or aborted.
"""

from __future__ import annotations

import io
import itertools
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from circus.common.enums import BuildStatus, EvaluationStatus
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

_SPECIAL = re.compile(r"[\\\t\n\r\x00]")


def _text(value: str) -> str:
    if _SPECIAL.search(value) is None:
        return value
    return (value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")
            .replace("\r", "\\r").replace("\x00", ""))


def _opt(value: str | None) -> str:
    return "\\N" if value is None else _text(value)


def _opt_int(value: int | None) -> str:
    return "\\N" if value is None else str(value)


def _array(items: Sequence[str]) -> str:
    quoted = ('"' + str(i).replace("\\", "\\\\").replace('"', '\\"') + '"' for i in items)
    return _text("{" + ",".join(quoted) + "}")


class _Lines(io.TextIOBase):
    """A file-like object over generated lines: COPY consumes it as it is produced."""

    def __init__(self, lines: Iterator[str]) -> None:
        self._lines = lines
        self._buffer = ""

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> str:
        want = 1 << 16 if size is None or size < 0 else size
        parts = [self._buffer]
        length = len(self._buffer)
        for line in self._lines:
            parts.append(line)
            length += len(line)
            if length >= want:
                break
        data = "".join(parts)
        self._buffer = data[want:]
        return data[:want]


def _copy(session: Session, table: str, columns: Sequence[str], lines: Iterable[str]) -> None:
    """``COPY table FROM STDIN`` of tab-separated ``lines`` (each ending in a newline)."""
    iterator = iter(lines)
    first = next(iterator, None)
    if first is None:
        return
    # psycopg2's COPY on the session's own connection: same transaction
    raw: Any = session.connection().connection.dbapi_connection
    with raw.cursor() as cursor:
        cursor.copy_expert(f"COPY {table} ({', '.join(columns)}) FROM STDIN",
                           _Lines(itertools.chain([first], iterator)))


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


BUILD_COLUMNS = ("id", "evaluation_id", "jobset_id", "project_id", "job_name", "drv_path",
                 "system", "priority", "max_retries", "is_aggregate", "is_fod",
                 "required_features", "nix_name", "meta_description", "meta_license",
                 "meta_homepage", "meta_maintainers", "timeout", "max_silent")


class BuildImporter:
    """Writes an evaluation's builds as its jobs arrive, inside one open transaction.

    :meth:`add` may run while Nix still evaluates (batches from a background
    thread); :meth:`finish` writes what needs every job (aggregate links,
    dependency edges), the per-job errors and the NOTIFY. The caller commits.
    """

    def __init__(self, session: Session, evaluation: Evaluation, jobset: Jobset, *,
                 reuse: bool, max_retries: int) -> None:
        self.session = session
        self.max_retries = max_retries
        self.eval_id = evaluation.id
        self.prefix = f"{evaluation.id}\t{jobset.id}\t{jobset.project_id}\t"
        self.previous: dict[str, tuple[int, str]] = {}
        if reuse:
            prev_id = previous_evaluation(session, evaluation)
            if prev_id is not None:
                # cancelled or aborted builds say nothing about the derivation: build anew
                rows = session.execute(text(
                    "SELECT b.job_name, b.id, b.drv_path FROM evaluation_builds eb "
                    "JOIN builds b ON b.id = eb.build_id WHERE eb.evaluation_id = :e "
                    "AND b.status NOT IN (:aborted, :cancelled)"),
                    {"e": prev_id, "aborted": int(BuildStatus.aborted),
                     "cancelled": int(BuildStatus.cancelled)})
                self.previous = {name: (build_id, drv) for name, build_id, drv in rows}
        self.build_of_job: dict[str, int] = {}
        self.build_of_drv: dict[str, int] = {}
        #: new builds: (job, id), for the links written by finish()
        self.created: list[tuple[Job, int]] = []
        self.reused = 0
        #: reused builds, whose status the new evaluation's commit should get too
        self.reused_ids: list[int] = []

    def add(self, jobs: Sequence[Job]) -> None:
        new_jobs: list[Job] = []
        reused: list[int] = []
        for job in jobs:
            if job.name in self.build_of_job:
                continue  # reported twice (a restarted run): keep the first
            old = self.previous.get(job.name)
            if old is not None and old[1] == job.drv_path:
                reused.append(old[0])
                self._remember(job, old[0])
            else:
                new_jobs.append(job)
        ids = _allocate_ids(self.session, len(new_jobs))
        for job, build_id in zip(new_jobs, ids, strict=True):
            self._remember(job, build_id)
            self.created.append((job, build_id))
        self.reused += len(reused)
        self.reused_ids += reused
        pairs = list(zip(new_jobs, ids, strict=True))
        _copy(self.session, "builds", BUILD_COLUMNS, self._build_lines(pairs))
        _copy(self.session, "build_outputs", ("build_id", "name", "path"),
              (f"{build_id}\t{_text(name)}\t{path}\n"
               for job, build_id in pairs for name, path in sorted(job.outputs.items())))
        eval_id = self.eval_id
        _copy(self.session, "evaluation_builds", ("evaluation_id", "build_id", "is_new"),
              itertools.chain((f"{eval_id}\t{i}\tt\n" for i in ids),
                              (f"{eval_id}\t{i}\tf\n" for i in reused)))

    def _remember(self, job: Job, build_id: int) -> None:
        self.build_of_job[job.name] = build_id
        self.build_of_drv.setdefault(job.drv_path, build_id)

    def _build_lines(self, pairs: list[tuple[Job, int]]) -> Iterator[str]:
        prefix, max_retries = self.prefix, self.max_retries
        for job, build_id in pairs:
            meta = job.meta
            if meta:
                priority = _int(meta.get("schedulingPriority")) or 0
                tail = "\t".join((
                    _opt(_description(meta.get("description"))),
                    _opt(_license(meta.get("license"))),
                    _opt(_homepage(meta.get("homepage"))),
                    _opt(_maintainers(meta.get("maintainers"))),
                    _opt_int(_int(meta.get("timeout"))),
                    _opt_int(_int(meta.get("maxSilent")))))
            else:
                priority = 0
                tail = "\\N\t\\N\t\\N\t\\N\t\\N\t\\N"
            features = job.features
            yield (f"{build_id}\t{prefix}{_text(job.name)}\t{job.drv_path}\t"
                   f"{_text(job.system)}\t{priority}\t{max_retries}\t"
                   f"{'t' if job.is_aggregate else 'f'}\t{'t' if job.is_fod else 'f'}\t"
                   f"{_array(features) if features else '{}'}\t{_opt(job.nix_name or None)}\t"
                   f"{tail}\n")

    def finish(self, errors: Sequence[JobError]) -> ImportStats:
        build_of_drv, build_of_job = self.build_of_drv, self.build_of_job

        def constituent_lines() -> Iterator[str]:
            for job, build_id in self.created:
                if not job.is_aggregate:
                    continue
                members = {build_of_drv[d] for d in job.constituents if d in build_of_drv}
                members |= {build_of_job[n] for n in job.named_constituents
                            if n in build_of_job}
                members.discard(build_id)
                for member in sorted(members):
                    yield f"{build_id}\t{member}\n"

        def dependency_lines() -> Iterator[str]:
            for job, build_id in self.created:
                if job.facts is None or not job.facts.input_drvs:
                    continue
                deps = {build_of_drv[d] for d in job.facts.input_drvs if d in build_of_drv}
                deps.discard(build_id)
                for dep in sorted(deps):
                    yield f"{build_id}\t{dep}\n"

        _copy(self.session, "build_constituents", ("aggregate_id", "constituent_id"),
              constituent_lines())
        _copy(self.session, "build_dependencies", ("build_id", "dependency_id"),
              dependency_lines())
        _copy(self.session, "evaluation_errors", ("evaluation_id", "job_name", "message"),
              (f"{self.eval_id}\t{_text(e.name)}\t{_text(e.message)}\n" for e in errors))
        if self.reused_ids:
            # the notification collector reports these builds' current status to this
            # evaluation's commit as well (only projects with notifications pay for it)
            self.session.execute(text(
                "UPDATE builds SET notification_pending_since = now() "
                "WHERE id = ANY(:ids) AND EXISTS (SELECT 1 FROM notification_configs c "
                "WHERE c.project_id = builds.project_id AND c.enabled)"),
                {"ids": self.reused_ids})
        # the queue runner LISTENs here; the notification is delivered on commit
        self.session.execute(text("SELECT pg_notify(:channel, :payload)"),
                             {"channel": NOTIFY_CHANNEL, "payload": str(self.eval_id)})
        return ImportStats(new=len(self.created), reused=self.reused, errors=len(errors))
