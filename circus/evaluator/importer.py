"""Turn an evaluation's jobs into builds, in bulk.

Everything is written with PostgreSQL ``COPY`` inside the caller's transaction:
ids are drawn from the sequence in one statement first, so outputs, memberships,
aggregate links and dependency edges are copied without reading anything back.
A 50,000-job evaluation is a handful of statements, never one flush per job.

Reuse (Hydra semantics): a job whose derivation equals the one of the same job in
the previous evaluation of the jobset links to that build (``evaluation_builds``
with ``is_new = false``) instead of queueing a duplicate, unless the jobset is in
``interval`` mode, which asks for fresh builds every time, or the old build was
cancelled or aborted. An aggregate naming its constituents is written last, once
every job is known (:mod:`circus.evaluator.aggregates` resolves the names and
globs); it is reused only when it links to the same jobs with the same derivations,
and one whose constituents are wrong fails at once with the reason.
"""

from __future__ import annotations

import io
import itertools
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg2.extensions
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from circus.common.enums import BuildStatus, EvaluationStatus
from circus.common.messaging import BUILDS_CHANNEL
from circus.common.models import Evaluation, Jobset
from circus.evaluator import aggregates
from circus.evaluator.jobs import Job, JobError


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


#: bytes handed to psycopg2 per read of a COPY's data (its default is 8 KiB)
COPY_READ_SIZE = 1 << 20


def _copy(session: Session, table: str, columns: Sequence[str], lines: Iterable[str]) -> None:
    """``COPY table FROM STDIN`` of tab-separated ``lines`` (each ending in a newline).

    The lines are joined into one string first: a batch is a few hundred kilobytes, and
    a file object yielding them as psycopg2 reads (8 KiB at a time) cost a Python loop
    iteration per line on top of generating it."""
    text_data = "".join(lines)
    if not text_data:
        return
    # psycopg2's COPY on the session's own connection: same transaction
    raw: Any = session.connection().connection.dbapi_connection
    # bytes in the connection's encoding, as psycopg2 would encode a str piece by piece
    data = text_data.encode(psycopg2.extensions.encodings[raw.encoding])
    with raw.cursor() as cursor:
        cursor.copy_expert(f"COPY {table} ({', '.join(columns)}) FROM STDIN",
                           io.BytesIO(data), size=COPY_READ_SIZE)


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


def _repeats(hydra: Any) -> int:
    """``meta.hydra.repeats`` (Hydra's per-job reproducibility setting); 0 when absent."""
    repeats = _int(hydra.get("repeats")) if isinstance(hydra, dict) else None
    return max(0, min(repeats or 0, 100))


def _outputs_to_install(value: Any, outputs: dict[str, str]) -> str:
    """``meta.outputsToInstall`` as a COPY array (outputs the job has, in its order), or NULL."""
    if not isinstance(value, list):
        return "\\N"
    names = [v for v in dict.fromkeys(value) if isinstance(v, str) and v in outputs]
    return _array(names) if names else "\\N"


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
                 "meta_homepage", "meta_maintainers", "timeout", "max_silent", "repeats",
                 "outputs_to_install")


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
        #: the drv path of every job written so far, by name
        self.drv_of_job: dict[str, str] = {}
        #: aggregates naming their constituents, by name, written by finish()
        self.deferred: dict[str, Job] = {}
        #: drv path -> (job name, build id) of the lowest job name with that derivation,
        #: so links to a derivation several jobs share do not depend on arrival order
        self.build_of_drv: dict[str, tuple[str, int]] = {}
        #: what finish() links, of the new builds: aggregates (job, id) and input
        #: derivations (id, drv paths). No Job is kept otherwise: at 50,000 jobs the
        #: records would be most of the evaluator's memory until the commit.
        self.new_aggregates: list[tuple[Job, int]] = []
        self.new_inputs: list[tuple[int, list[str]]] = []
        self.new = 0
        self.reused = 0
        #: reused builds, whose status the new evaluation's commit should get too
        self.reused_ids: list[int] = []

    def add(self, jobs: Sequence[Job]) -> None:
        new_jobs: list[Job] = []
        reused: list[tuple[Job, int]] = []
        for job in jobs:
            if job.name in self.drv_of_job or job.name in self.deferred:
                continue  # reported twice (a restarted run): keep the first
            if job.named_constituents:
                # what it links to depends on the other jobs: decided in finish()
                self.deferred[job.name] = job
                continue
            old = self.previous.get(job.name)
            if old is not None and old[1] == job.drv_path:
                reused.append((job, old[0]))
            else:
                new_jobs.append(job)
        self._write(new_jobs, reused)

    def _write(self, new_jobs: Sequence[Job], reused: Sequence[tuple[Job, int]]) -> None:
        for job, build_id in reused:
            self._remember(job, build_id)
        ids = _allocate_ids(self.session, len(new_jobs))
        for job, build_id in zip(new_jobs, ids, strict=True):
            self._remember(job, build_id)
            if job.is_aggregate:
                self.new_aggregates.append((job, build_id))
            if job.facts is not None and job.facts.input_drvs:
                self.new_inputs.append((build_id, job.facts.input_drvs))
        self.new += len(new_jobs)
        self.reused += len(reused)
        self.reused_ids += [build_id for _, build_id in reused]
        pairs = list(zip(new_jobs, ids, strict=True))
        _copy(self.session, "builds", BUILD_COLUMNS, self._build_lines(pairs))
        _copy(self.session, "build_outputs", ("build_id", "name", "path"),
              (f"{build_id}\t{_text(name)}\t{path}\n"
               for job, build_id in pairs for name, path in sorted(job.outputs.items())))
        eval_id = self.eval_id
        _copy(self.session, "evaluation_builds", ("evaluation_id", "build_id", "is_new"),
              itertools.chain((f"{eval_id}\t{i}\tt\n" for i in ids),
                              (f"{eval_id}\t{i}\tf\n" for _, i in reused)))

    def _add_deferred(self, resolved: dict[str, aggregates.Resolution]) -> None:
        """Write the aggregates naming their constituents, once every job is known.

        One is reused only when it would be the same aggregate: same derivation, no
        error, and links to the same jobs with the same derivations as before (a
        named constituent is not part of the aggregate's derivation, unlike Hydra's
        rewritten aggregates, so a changed constituent means a new aggregate build).
        """
        name_of_drv = {drv: name for drv, (name, _) in self.build_of_drv.items()}
        candidates: dict[int, Job] = {}
        new_jobs: list[Job] = []
        for job in self.deferred.values():
            old = self.previous.get(job.name)
            if old is not None and old[1] == job.drv_path and not resolved[job.name].errors:
                candidates[old[0]] = job
            else:
                new_jobs.append(job)
        before: dict[int, set[tuple[str, str]]] = {i: set() for i in candidates}
        if candidates:
            for aggregate_id, name, drv in self.session.execute(text(
                    "SELECT c.aggregate_id, b.job_name, b.drv_path FROM build_constituents c "
                    "JOIN builds b ON b.id = c.constituent_id WHERE c.aggregate_id = ANY(:ids)"),
                    {"ids": sorted(candidates)}):
                before[aggregate_id].add((name, drv))
        reused: list[tuple[Job, int]] = []
        for old_id, job in candidates.items():
            names = {name_of_drv[d] for d in job.constituents if d in name_of_drv}
            names |= resolved[job.name].members
            names.discard(job.name)
            now = {(n, self._drv_of(n)) for n in names}
            if now == before[old_id]:
                reused.append((job, old_id))
            else:
                new_jobs.append(job)
        self._write(new_jobs, reused)

    def _drv_of(self, name: str) -> str:
        drv = self.drv_of_job.get(name)
        return drv if drv is not None else self.deferred[name].drv_path

    def _remember(self, job: Job, build_id: int) -> None:
        self.build_of_job[job.name] = build_id
        self.drv_of_job[job.name] = job.drv_path
        known = self.build_of_drv.get(job.drv_path)
        if known is None or job.name < known[0]:
            self.build_of_drv[job.drv_path] = (job.name, build_id)

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
                    _opt_int(_int(meta.get("maxSilent"))),
                    str(_repeats(meta.get("hydra"))),
                    _outputs_to_install(meta.get("outputsToInstall"), job.outputs)))
            else:
                priority = 0
                tail = "\\N\t\\N\t\\N\t\\N\t\\N\t\\N\t0\t\\N"
            features = job.features
            yield (f"{build_id}\t{prefix}{_text(job.name)}\t{job.drv_path}\t"
                   f"{_text(job.system)}\t{priority}\t{max_retries}\t"
                   f"{'t' if job.is_aggregate else 'f'}\t{'t' if job.is_fod else 'f'}\t"
                   f"{_array(features) if features else '{}'}\t{_opt(job.nix_name or None)}\t"
                   f"{tail}\n")

    def finish(self, errors: Sequence[JobError]) -> ImportStats:
        resolved = aggregates.resolve(self.drv_of_job.keys() | self.deferred.keys(),
                                      self.deferred, {e.name: e.message for e in errors})
        self._add_deferred(resolved)
        build_of_drv = {drv: build_id for drv, (_, build_id) in self.build_of_drv.items()}
        build_of_job = self.build_of_job
        failed: dict[int, str] = {}
        build_of_output: dict[str, int] = {}
        wanted = sorted({path for job, _ in self.new_aggregates
                         for path in job.constituent_outputs})
        if wanted:
            # constituents known only by output path (read from an aggregate's .drv):
            # the outputs this evaluation's builds (new and reused) have, as written
            rows = self.session.execute(text(
                "SELECT o.path, b.drv_path FROM build_outputs o "
                "JOIN evaluation_builds eb ON eb.build_id = o.build_id "
                "JOIN builds b ON b.id = o.build_id "
                "WHERE eb.evaluation_id = :e AND o.path = ANY(:paths)"),
                {"e": self.eval_id, "paths": wanted})
            build_of_output = {path: build_of_drv[drv] for path, drv in rows
                               if drv in build_of_drv}

        def constituent_lines() -> Iterator[str]:
            for job, build_id in self.new_aggregates:
                members = {build_of_drv[d] for d in job.constituents if d in build_of_drv}
                members |= {build_of_output[p] for p in job.constituent_outputs
                            if p in build_of_output}
                problems = list(job.constituent_errors)
                resolution = resolved.get(job.name)
                if resolution is not None:
                    members |= {build_of_job[n] for n in resolution.members}
                    problems += resolution.errors
                if problems:
                    failed[build_id] = "\n".join(problems)
                members.discard(build_id)
                for member in sorted(members):
                    yield f"{build_id}\t{member}\n"

        def dependency_lines() -> Iterator[str]:
            for build_id, input_drvs in self.new_inputs:
                deps = {build_of_drv[d] for d in input_drvs if d in build_of_drv}
                deps.discard(build_id)
                for dep in sorted(deps):
                    yield f"{build_id}\t{dep}\n"

        _copy(self.session, "build_constituents", ("aggregate_id", "constituent_id"),
              constituent_lines())
        if failed:
            # Hydra records these on the aggregate: it fails now, never queued
            ids = sorted(failed)
            self.session.execute(text(
                "UPDATE builds AS b SET status = :failed, error_message = v.message, "
                "started_at = now(), completed_at = now(), notification_pending_since = now() "
                "FROM unnest(CAST(:ids AS bigint[]), CAST(:messages AS text[])) "
                "AS v(id, message) WHERE b.id = v.id"),
                {"failed": int(BuildStatus.failed), "ids": ids,
                 "messages": [failed[i] for i in ids]})
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
                             {"channel": BUILDS_CHANNEL, "payload": str(self.eval_id)})
        return ImportStats(new=self.new, reused=self.reused, errors=len(errors))
