"""Run one evaluation: claim it, resolve inputs, evaluate, import the builds.

Whatever happens, the outcome lands on the evaluation row (and, for fetch
errors, on the jobset); nothing here raises into the Celery worker.

Concurrency: the evaluation holds a session-level advisory lock keyed by its
jobset for as long as it runs (a dedicated connection). Two evaluations of one
jobset can therefore never run at once, and the beat tick recognises a
``running`` evaluation whose lock is free as orphaned by a dead worker.
Claims are serialised by a transaction-level advisory lock, so
``evaluator.max_concurrent_evals`` holds across every evaluator process.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

from sqlalchemy import Connection, Engine, func, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from circus.common.config import Settings
from circus.common.enums import EvaluationStatus, JobsetState, TriggerMode
from circus.common.models import Evaluation, Jobset
from circus.common.nix.environment import evaluation_environ
from circus.common.outbound import Allowlist
from circus.common.statussql import EVALUATION_PENDING
from circus.evaluator import fallback, nixevaljobs, remotes
from circus.evaluator.git import Mirror
from circus.evaluator.importer import BuildImporter, ImportStats
from circus.evaluator.inputs import (
    InputError,
    Resolution,
    classic_args,
    materialise,
    mirror_for,
    resolve,
)
from circus.evaluator.program import (
    EvalFailed,
    EvalResult,
    EvalSpec,
    EvalStopped,
    JobSink,
    Progress,
)
from circus.evaluator.upload import UploadFailed, upload_derivations, uploads_derivations
from circus.projects.channels import advance_channels

log = logging.getLogger(__name__)

#: advisory lock namespaces ("CIRC" and "CIRE")
JOBSET_LOCK = 0x43495243
CLAIM_LOCK = 0x43495245
#: seconds between progress updates / cancellation checks while Nix runs
PROGRESS_INTERVAL = 1.0


def jobset_lock_key(jobset_id: int) -> int:
    return jobset_id % 2147483647


def utcnow() -> datetime:
    return datetime.now(UTC)


def gc_roots_dir(settings: Settings, evaluation_id: int) -> Path:
    return settings.evaluator.gc_roots_dir(evaluation_id)


def run_dir(settings: Settings, evaluation_id: int) -> Path:
    return Path(settings.evaluator.work_dir) / "runs" / f"eval-{evaluation_id}"


def nix_home(settings: Settings) -> Path:
    """HOME of evaluation's Nix processes (their fetcher caches), never the server's."""
    home = Path(settings.evaluator.work_dir) / "home"
    home.mkdir(parents=True, exist_ok=True)
    return home


@dataclass
class Outcome:
    status: str  # completed | failed | timed_out | cancelled | deferred | skipped | busy
    stats: ImportStats | None = None
    #: seconds spent fetching inputs, in the evaluation program, and importing
    fetch_time: float = 0.0
    program_time: float = 0.0
    import_time: float = 0.0


class JobsetLock:
    """A session-level advisory lock on a dedicated connection."""

    def __init__(self, engine: Engine, jobset_id: int) -> None:
        self.engine = engine
        self.key = jobset_lock_key(jobset_id)
        self.conn: Connection | None = None

    def acquire(self) -> bool:
        conn = self.engine.connect()
        got = bool(conn.execute(select(func.pg_try_advisory_lock(JOBSET_LOCK, self.key)))
                   .scalar())
        conn.commit()
        if not got:
            conn.close()
            return False
        self.conn = conn
        return True

    def release(self) -> None:
        if self.conn is None:
            return
        try:
            self.conn.execute(select(func.pg_advisory_unlock(JOBSET_LOCK, self.key)))
            self.conn.commit()
        except Exception:
            log.exception("releasing the jobset lock failed (the connection closes anyway)")
        finally:
            self.conn.close()
            self.conn = None


def _claim(factory: sessionmaker[Session], settings: Settings, evaluation_id: int,
           task_id: str | None) -> str:
    with factory() as session, session.begin():
        session.execute(select(func.pg_advisory_xact_lock(CLAIM_LOCK, 0)))
        running = session.scalar(select(func.count()).select_from(Evaluation)
                                 .where(Evaluation.status == EvaluationStatus.running)) or 0
        if running >= settings.evaluator.max_concurrent_evals:
            return "deferred"
        claimed = session.execute(
            update(Evaluation)
            .where(Evaluation.id == evaluation_id,
                   Evaluation.status == EvaluationStatus.pending)
            .values(status=EvaluationStatus.running, started_at=utcnow(), task_id=task_id)
            .returning(Evaluation.id)).first()
        return "claimed" if claimed else "skipped"


def _finish(factory: sessionmaker[Session], evaluation_id: int, status: EvaluationStatus,
            *, error: str | None = None, stderr_tail: str | None = None,
            jobset_error: str | None = None, eval_time: float | None = None) -> bool:
    """Finish a running evaluation unsuccessfully; False if it was no longer running."""
    now = utcnow()
    with factory() as session, session.begin():
        row = session.execute(
            update(Evaluation)
            .where(Evaluation.id == evaluation_id,
                   Evaluation.status == EvaluationStatus.running)
            .values(status=status, error_message=error, stderr_tail=stderr_tail,
                    finished_at=now, eval_time=eval_time)
            .returning(Evaluation.jobset_id)).first()
        if row is None:
            return False
        # the jobset's error is the fetch error; any later failure means fetching worked
        values: dict[str, object] = {"last_checked_at": now, "last_check_outcome": "error",
                                     "error_message": jobset_error,
                                     "error_at": now if jobset_error else None}
        session.execute(update(Jobset).where(Jobset.id == row[0]).values(**values))
    return True


class _Watcher:
    """Reports progress and notices cancellation, at most once per interval."""

    def __init__(self, factory: sessionmaker[Session], evaluation_id: int,
                 progress: Progress) -> None:
        self.factory = factory
        self.evaluation_id = evaluation_id
        self.progress = progress
        self.next_check = 0.0
        self.stop = False

    def __call__(self) -> bool:
        now = time.monotonic()
        if now < self.next_check:
            return self.stop
        self.next_check = now + PROGRESS_INTERVAL
        try:
            with self.factory() as session, session.begin():
                status = session.execute(
                    update(Evaluation).where(Evaluation.id == self.evaluation_id)
                    .values(attrs_total=self.progress.total, attrs_done=self.progress.done)
                    .returning(Evaluation.status)).scalar()
        except Exception:
            log.exception("progress update of evaluation %s failed", self.evaluation_id)
            return self.stop
        self.stop = status is not EvaluationStatus.running
        return self.stop


def build_spec(settings: Settings, evaluation: Evaluation, jobset: Jobset,
               resolution: Resolution) -> EvalSpec:
    ev = settings.evaluator
    allowlist = Allowlist.parse(settings.server.outbound_allowlist)
    spec = EvalSpec(
        restrict_eval=ev.restrict_eval,
        allowed_uris=remotes.permitted_uris(ev.allowed_uris, allowlist),
        allow_ifd=ev.allow_ifd, workers=ev.workers, max_memory_size=ev.max_memory_size,
        run_dir=run_dir(settings, evaluation.id),
        gc_roots_dir=gc_roots_dir(settings, evaluation.id),
        env=evaluation_environ(settings.nix_environ(), nix_home(settings)),
        deadline=time.monotonic() + ev.nix_timeout,
    )
    source = resolution.source
    if resolution.flake_mode:
        assert source is not None
        assert source.revision is not None
        mirror = mirror_for(settings, source.value)
        if not mirror.has_file(source.revision, "flake.nix"):
            raise EvalFailed(
                f"{source.value} has no flake.nix at {source.branch or 'its branch'} "
                f"({source.revision[:12]}); this jobset is in flake mode — add a flake.nix "
                "or switch the jobset to a classic (non-flake) expression")
        _check_flake_inputs(mirror, source.revision, allowlist)
        ref = quote(f"refs/heads/{source.branch}", safe="/")
        spec.flake_ref = f"git+file://{mirror.path}?ref={ref}&rev={source.revision}"
        spec.display_name = source.value
        expression = (jobset.nix_expression or "").strip() or "hydraJobs"
        spec.attr_path = [part.strip('"') for part in _split_attr(expression)]
        spec.fallback_to_checks = spec.attr_path == ["hydraJobs"]
        # flakes stay pure whatever evaluator.restrict_eval says (nix-eval-jobs evaluates
        # them in pure mode; the walker's getFlake gets the closest, restricted mode),
        # allowed the exact locked reference: Nix matches allowed-uris as prefixes, and
        # the mirror's path let `fetchTree "git+file://<mirror>/../<any>"` read any
        # repository on the server
        spec.restrict_eval = True
        spec.allowed_uris.append(spec.flake_ref)
        return spec
    if source is None or source.store_path is None:
        raise EvalFailed("the jobset's expression input has no source")
    relative = (jobset.nix_expression or "").strip().lstrip("/") or "default.nix"
    if ".." in Path(relative).parts:
        raise EvalFailed(f"the expression path {relative!r} leaves its input")
    expr_file = Path(source.store_path) / relative
    if not expr_file.resolve().is_relative_to(Path(source.store_path).resolve()):
        # a symlink out of the input (whether its target exists is none of its business)
        raise EvalFailed(f"the expression path {relative!r} leaves its input")
    if not expr_file.exists():
        where = (f"input {jobset.nix_expression_input!r}" if jobset.nix_expression_input
                 else "the project's repository")
        raise EvalFailed(f"file {relative!r} does not exist in {where}"
                         + (f" at {source.revision[:12]}" if source.revision else ""))
    spec.file = str(expr_file)
    spec.args, spec.include = classic_args(resolution)
    if source.name and source.name not in spec.include:
        spec.include[source.name] = source.store_path
    return spec


def _check_flake_inputs(mirror: Mirror, revision: str, allowlist: Allowlist) -> None:
    """Refuse a flake whose ``flake.lock`` points Nix at a non-public address (the same
    rule as the repository's own git remote, :mod:`circus.evaluator.remotes`)."""
    shown = mirror.git("show", f"{revision}:flake.lock")
    if shown.returncode != 0:
        return   # no lock file: Nix's allowed-uris alone governs what flake.nix names
    problems = remotes.flake_input_problems(shown.stdout, allowlist)
    if problems:
        raise EvalFailed("refused to fetch the flake's inputs: " + "; ".join(problems))


def _split_attr(expression: str) -> list[str]:
    """``a."b.c".d`` -> ``["a", "b.c", "d"]``."""
    parts: list[str] = []
    current = ""
    quoted = False
    for char in expression:
        if char == '"':
            quoted = not quoted
        elif char == "." and not quoted:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [p for p in parts if p]


def run_program(spec: EvalSpec, progress: Progress, sink: JobSink,
                should_stop: _Watcher) -> EvalResult:
    spec.run_dir.mkdir(parents=True, exist_ok=True)
    program = nixevaljobs.available()
    if program is not None:
        return nixevaljobs.evaluate(spec, progress, sink, program=program,
                                    should_stop=should_stop)
    return fallback.evaluate(spec, progress, sink, roots_name="roots", should_stop=should_stop)


def execute(factory: sessionmaker[Session], settings: Settings, evaluation_id: int, *,
            task_id: str | None = None) -> Outcome:
    """Run evaluation ``evaluation_id`` to its end (the Celery task's body)."""
    with factory() as session:
        evaluation = session.get(Evaluation, evaluation_id)
        if evaluation is None or evaluation.status is not EvaluationStatus.pending:
            return Outcome("skipped")
        jobset_id = evaluation.jobset_id
    engine = factory.kw["bind"]
    lock = JobsetLock(engine, jobset_id)
    if not lock.acquire():
        return Outcome("busy")
    try:
        claim = _claim(factory, settings, evaluation_id, task_id)
        if claim != "claimed":
            return Outcome(claim)
        try:
            return _run_claimed(factory, settings, evaluation_id)
        except Exception as exc:
            log.exception("evaluation %s crashed", evaluation_id)
            _finish(factory, evaluation_id, EvaluationStatus.failed,
                    error=f"internal error in the evaluator: {type(exc).__name__}: {exc}")
            return Outcome("failed")
        finally:
            shutil.rmtree(run_dir(settings, evaluation_id), ignore_errors=True)
    finally:
        lock.release()


def _run_claimed(factory: sessionmaker[Session], settings: Settings,
                 evaluation_id: int) -> Outcome:
    started = time.monotonic()
    with factory() as session:
        evaluation = session.get_one(Evaluation, evaluation_id)
        jobset = session.get_one(Jobset, evaluation.jobset_id)
        _ = jobset.project, jobset.inputs
        pinned = evaluation.commit_hash if evaluation.pr_number is not None else None
        try:
            resolution = resolve(session, settings, jobset,
                                 branch=evaluation.pr_head_branch, revision=pinned)
            materialise(settings, resolution)
        except InputError as exc:
            message = str(exc)
            _finish(factory, evaluation_id, EvaluationStatus.failed, error=message,
                    jobset_error=message, eval_time=time.monotonic() - started)
            return Outcome("failed")
        session.execute(update(Evaluation).where(Evaluation.id == evaluation_id).values(
            commit_hash=resolution.commit_hash, inputs_hash=resolution.inputs_hash,
            inputs=resolution.to_json()))
        session.commit()
        fetched = time.monotonic()
        progress = Progress()
        watcher = _Watcher(factory, evaluation_id, progress)
        importer: BuildImporter | None = None
        sink: JobSink | None = None
        try:
            spec = build_spec(settings, evaluation, jobset, resolution)
            if spec.flake_ref is not None:
                session.execute(update(Evaluation).where(Evaluation.id == evaluation_id)
                                .values(flake_ref=spec.flake_ref))
                session.commit()
            # builds are written while Nix evaluates, in a transaction committed at the end
            importer = BuildImporter(session, evaluation, jobset,
                                     reuse=jobset.trigger_mode is not TriggerMode.interval,
                                     max_retries=settings.queue_runner.max_retries)
            sink = JobSink(importer.add)
            result = run_program(spec, progress, sink, watcher)
            evaluated = time.monotonic()
            sink.close()
        except EvalFailed as exc:
            _abandon(session, sink)
            _finish(factory, evaluation_id, EvaluationStatus.failed, error=exc.message,
                    stderr_tail=exc.stderr_tail or None, eval_time=time.monotonic() - started)
            return Outcome("failed")
        except EvalStopped as exc:
            _abandon(session, sink)
            if exc.reason == "timeout":
                _finish(factory, evaluation_id, EvaluationStatus.timed_out,
                        error=(f"the evaluation took longer than evaluator.nix_timeout "
                               f"({settings.evaluator.nix_timeout} s) and was killed"),
                        stderr_tail=exc.stderr_tail or None,
                        eval_time=time.monotonic() - started)
                return Outcome("timed_out")
            return Outcome("cancelled")
        except BaseException:
            _abandon(session, sink)
            raise
        try:
            outcome = _commit_builds(session, settings, importer, evaluation_id, jobset,
                                     result, started)
        except UploadFailed as exc:
            log.warning("evaluation %s: %s", evaluation_id, exc)
            _finish(factory, evaluation_id, EvaluationStatus.failed, error=str(exc),
                    eval_time=time.monotonic() - started)
            return Outcome("failed")
        outcome.fetch_time = fetched - started
        outcome.program_time = evaluated - fetched
        outcome.import_time = time.monotonic() - evaluated
        return outcome


def _abandon(session: Session, sink: JobSink | None) -> None:
    """Stop the import and drop what it wrote (the transaction never commits)."""
    if sink is not None:
        try:
            sink.close()
        except Exception:
            log.debug("the import was failing too", exc_info=True)
    session.rollback()


def _commit_builds(session: Session, settings: Settings, importer: BuildImporter,
                   evaluation_id: int, jobset: Jobset, result: EvalResult, started: float
                   ) -> Outcome:
    now = utcnow()
    eval_time = time.monotonic() - started
    total = result.job_count + len(result.errors)
    # conditional: a cancellation that won the race keeps the evaluation cancelled
    claimed = session.execute(
        update(Evaluation)
        .where(Evaluation.id == evaluation_id, Evaluation.status == EvaluationStatus.running)
        .values(status=EvaluationStatus.completed, finished_at=now, eval_time=eval_time,
                attrs_total=total, attrs_done=total, error_message=None)
        .returning(Evaluation.id)).first()
    if claimed is None:
        session.rollback()
        return Outcome("cancelled")
    stats = importer.finish(result.errors)
    values: dict[str, object] = {"last_checked_at": now, "last_check_outcome": "evaluated",
                                 "error_message": None, "error_at": None}
    if jobset.state is JobsetState.one_shot:
        values["state"] = JobsetState.disabled
    session.execute(update(Evaluation).where(Evaluation.id == evaluation_id)
                    .values(builds_new=stats.new, builds_reused=stats.reused))
    session.execute(update(Jobset).where(Jobset.id == jobset.id).values(**values))
    # an evaluation of builds that all succeeded already is good at once
    advance_channels(session, jobset.id)
    if uploads_derivations(settings):
        # before the commit (and its NOTIFY): the dispatcher must never see a build
        # whose .drv is not in the server's store
        try:
            upload_derivations(settings, evaluation_id, session.execute(text(
                "SELECT b.drv_path FROM evaluation_builds eb JOIN builds b ON b.id = eb.build_id "
                "WHERE eb.evaluation_id = :id AND eb.is_new"), {"id": evaluation_id}).scalars())
        except UploadFailed:
            session.rollback()
            raise
    session.commit()
    log.info("evaluation %s: %d new builds, %d reused, %d errors in %.1f s (%s)",
             evaluation_id, stats.new, stats.reused, stats.errors, eval_time, result.program)
    return Outcome("completed", stats)


def next_pending(session: Session) -> list[int]:
    """Pending evaluations waiting for a slot, oldest first."""
    rows = session.execute(text(
        f"SELECT id FROM evaluations WHERE status = {EVALUATION_PENDING} ORDER BY id LIMIT 20"))
    return [int(r[0]) for r in rows]
