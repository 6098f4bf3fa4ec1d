"""The built-in evaluation program: ``nix-instantiate`` running ``walk.nix``.

One Nix process evaluates the whole jobset and streams a record per job
(``builtins.trace`` lines on stderr), so the import can start reading .drv files
while Nix still works. Errors are isolated without one process per job:

* a ``throw``/``assert`` in a job is caught in Nix (``tryEval``) and the walk
  goes on; ``tryEval`` drops the message, so a second run evaluates just the
  failed jobs without catching, one failure per run, to record each message;
* an error ``tryEval`` cannot catch (missing attribute, type error, ``abort``)
  kills the process; the last marker names the attribute, its message is the
  stderr tail, and the walk restarts, skipping what is already done.
"""

from __future__ import annotations

import collections
import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from circus.common.nix import gcroots
from circus.evaluator import proc
from circus.evaluator.jobs import (
    Job,
    JobError,
    RecordError,
    attr_name,
    job_from_record,
    plain_job,
)
from circus.evaluator.program import (
    WALK_NIX,
    EvalFailed,
    EvalResult,
    EvalSpec,
    EvalStopped,
    JobSink,
    Progress,
    dump_json,
    error_text,
    nix_list,
    nix_string,
    remaining,
)

log = logging.getLogger(__name__)

#: restarts after uncatchable errors before the evaluation gives up
MAX_CRASH_RESTARTS = 200
#: runs spent collecting the messages of caught errors (one message per run)
MAX_MESSAGE_RUNS = 100
_DECODER = json.JSONDecoder()
#: Nix starts its garbage-collected heap at a quarter of RAM, up to 384 MiB, and
#: collects only once that is full: everything the walk allocates (records, JSON,
#: markers) then stays resident, twice nix-instantiate's memory at 50,000 jobs. From
#: 32 MiB the heap grows with what is live (~1.3x less resident at 20,000 jobs,
#: a few collections of CPU time).
GC_INITIAL_HEAP_SIZE = str(32 << 20)
MESSAGE_NOT_CAPTURED = ("evaluation failed (throw or assert); its message was not captured "
                        "because too many jobs of this evaluation failed")


@dataclass
class _RunState:
    """What one nix-instantiate run reported."""

    marker: str
    last: tuple[str, str] | None = None  # (kind, key) of the last marker seen
    #: what Nix printed after the last marker (bounded: user code may trace a lot)
    stderr_since_marker: collections.deque[str] = field(
        default_factory=lambda: collections.deque(maxlen=400))


class Walker:
    def __init__(self, spec: EvalSpec, progress: Progress, sink: JobSink,
                 should_stop: Callable[[], bool] | None = None) -> None:
        self.spec = spec
        self.progress = progress
        self.should_stop = should_stop
        self.marker = f"trace: @circus-{secrets.token_hex(6)}@"
        #: JSON paths of the jobs handed to the sink (the Job objects are the importer's)
        self.jobs: set[str] = set()
        self.errors: dict[str, JobError] = {}
        #: JSON path -> drv path (job) or None (failed / not a job): skipped on restarts
        self.done: dict[str, str | None] = {}
        self.caught: list[str] = []
        self.sink = sink
        #: the first run prints no B/S markers (speed); after a crash they are needed
        self.markers = False
        self.runs = 0
        self.root_attr_path: list[str] = list(spec.attr_path)

    # -- one process ---------------------------------------------------------

    def _expression(self, *, catch: bool, only: list[str] | None, roots: bool) -> Path:
        run_dir = self.spec.run_dir
        self.runs += 1
        skip_file = run_dir / f"skip-{self.runs}.json"
        dump_json(skip_file, self.done)
        only_nix = "null"
        if only is not None:
            only_nix = "[ " + " ".join(nix_list(json.loads(key)) for key in only) + " ]"
        marker = self.marker.removeprefix("trace: ")
        expr = f"""
let r = {self.spec.root_expression()};
in import {nix_string(str(WALK_NIX))} {{
  inherit (r) root rootName;
  marker = {nix_string(marker)};
  skip = builtins.fromJSON (builtins.readFile {nix_string(str(skip_file))});
  only = {only_nix};
  catch = {"true" if catch else "false"};
  rootsName = {nix_string("circus-eval-roots") if roots else "null"};
  markers = {"true" if self.markers or only is not None else "false"};
}}
"""
        path = run_dir / f"eval-{self.runs}.nix"
        path.write_text(expr)
        return path

    def _run(self, expr_file: Path) -> tuple[proc.Finished, _RunState]:
        state = _RunState(self.marker)
        marker = self.marker
        cut = len(marker) + 1

        def on_stderr(line: str) -> bool:
            if not line.startswith(marker):
                state.stderr_since_marker.append(line)
                return True
            kind = line[len(marker)]
            body = line[cut:]
            if state.stderr_since_marker:
                state.stderr_since_marker.clear()
            if kind == "J":
                # "<path> <record>": Nix's logger turns tabs into spaces
                path, end = _DECODER.raw_decode(body)
                record, stop = _DECODER.raw_decode(body, end + 1)
                if stop != len(body):
                    record = json.loads(body[end + 1:])  # raises on what trails it
                self._job(body[:end], path, record)
                state.last = None
            elif kind == "F":
                self.done[body] = None
                self.caught.append(body)
                self.progress.done += 1
                state.last = None
            elif kind == "T":
                self.progress.total = len(self.done) + int(body)
                state.last = None
            else:  # B (structure) or S (job)
                state.last = (kind, body)
            return False

        argv = ["nix-instantiate", "--eval", "--strict", "--json", "--read-write-mode",
                *self.spec.nix_options(),
                "-I", f"circus-walk={WALK_NIX.parent}",
                "-I", f"circus-run={self.spec.run_dir}",
                str(expr_file)]
        try:
            finished = proc.stream(argv, env={**self.spec.env,
                                              "GC_INITIAL_HEAP_SIZE": GC_INITIAL_HEAP_SIZE},
                                   cwd=str(self.spec.run_dir),
                                   deadline=self.spec.deadline, should_stop=self.should_stop,
                                   on_stderr=on_stderr)
        except proc.Stopped as stop:
            raise EvalStopped(stop.reason, stop.tail) from None
        return finished, state

    def _job(self, key: str, path: list[str], record: dict[str, object]) -> None:
        job = plain_job(path, record)
        if job is None:
            record["attrPath"] = path
            try:
                found = job_from_record(record)
            except RecordError as exc:
                self.errors[key] = JobError(attr_name(path), str(exc))
                self.done[key] = None
                return
            assert isinstance(found, Job)
            job = found
        self.jobs.add(key)
        self.done[key] = job.drv_path
        self.sink.submit(job)
        self.progress.done += 1
        self.progress.total = max(self.progress.total, self.progress.done)

    # -- the passes ------------------------------------------------------------

    def walk(self) -> str | None:
        """Walk everything; return the roots file (None when restarts happened)."""
        for _ in range(MAX_CRASH_RESTARTS + 1):
            first = not self.done
            finished, state = self._run(self._expression(catch=True, only=None, roots=first))
            if finished.returncode == 0:
                return gcroots.printed_path(finished.stdout_tail) if first else None
            if not self.markers:
                # Nix died and the fast run cannot say where: run again with markers
                # (skipping the jobs already done)
                self.markers = True
                continue
            culprit = state.last
            message = error_text("\n".join(state.stderr_since_marker))
            if culprit is None or culprit[1] == "[]":
                # before the first attribute: the jobset as a whole does not evaluate
                raise EvalFailed(message, finished.stderr_tail)
            self._record_error(culprit[1], message)
        raise EvalFailed(f"more than {MAX_CRASH_RESTARTS} attributes failed with errors that "
                         "abort Nix (missing attributes, type errors); fix those first")

    def collect_messages(self) -> None:
        """Re-evaluate jobs whose errors ``tryEval`` caught, to record their messages."""
        pending = [key for key in self.caught if key not in self.errors]
        runs = 0
        while pending and runs < MAX_MESSAGE_RUNS:
            runs += 1
            for key in pending:
                self.done.pop(key, None)
            finished, state = self._run(self._expression(catch=False, only=pending,
                                                         roots=False))
            if finished.returncode == 0:
                # nothing failed this time (non-deterministic evaluation)
                for key in pending:
                    if key not in self.jobs:
                        self._record_error(key, "evaluation failed, but not when repeated")
                return
            if state.last is None:
                raise EvalFailed(error_text("\n".join(state.stderr_since_marker)),
                                 finished.stderr_tail)
            culprit = state.last[1]
            self._record_error(culprit, error_text("\n".join(state.stderr_since_marker)))
            # jobs before the culprit succeeded or failed again in this run (recorded)
            index = pending.index(culprit) if culprit in pending else -1
            pending = [key for key in pending[index + 1:] if key not in self.jobs]
        for key in pending:
            self._record_error(key, MESSAGE_NOT_CAPTURED)

    def _record_error(self, key: str, message: str) -> None:
        if key in self.jobs:
            return  # already a job (and maybe imported): keep it
        self.errors[key] = JobError(attr_name(json.loads(key)), message)
        self.done[key] = None

    def result(self) -> EvalResult:
        return EvalResult(job_count=len(self.jobs), errors=list(self.errors.values()),
                          attr_path=self.root_attr_path, program="builtin")

    def drv_paths(self) -> list[str]:
        return [drv for key, drv in self.done.items() if drv is not None and key in self.jobs]


def make_roots_file(spec: EvalSpec, drv_paths: list[str]) -> str | None:
    """One store file referencing every drv (after restarts, the walk made none)."""
    if not drv_paths:
        return None
    return gcroots.write_roots_file(drv_paths, spec.env, remaining(spec.deadline) or 600,
                                    spec.run_dir)


def register_root(spec: EvalSpec, store_path: str, name: str) -> None:
    """``<gc_roots_dir>/<name>`` -> store_path, registered as an indirect GC root."""
    gcroots.add_indirect_root(spec.gc_roots_dir / name, store_path, spec.env)


def evaluate(spec: EvalSpec, progress: Progress, sink: JobSink, *, roots_name: str,
             should_stop: Callable[[], bool] | None = None) -> EvalResult:
    """Evaluate ``spec``; jobs go to ``sink`` as they come (the caller closes it)."""
    started = time.monotonic()
    walker = Walker(spec, progress, sink, should_stop)
    roots = walker.walk()
    walker.collect_messages()
    result = walker.result()
    if roots is None:
        roots = make_roots_file(spec, walker.drv_paths())
    if roots is not None:
        register_root(spec, roots, roots_name)
    log.info("built-in evaluator: %d jobs, %d errors, %d runs in %.1f s", result.job_count,
             len(result.errors), walker.runs, time.monotonic() - started)
    return result
