"""The nix-eval-jobs evaluation program (used whenever it is on ``PATH``).

A short probe with ``nix-instantiate`` runs first: it picks ``hydraJobs`` or
``checks`` and turns a missing attribute, a non-attribute-set or a broken
expression into a readable error before nix-eval-jobs starts its workers.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from typing import Any

from circus.common.nix.process import run as run_process
from circus.evaluator import proc
from circus.evaluator.jobs import JobError, RecordError, attr_name, job_from_record
from circus.evaluator.program import (
    EvalFailed,
    EvalResult,
    EvalSpec,
    EvalStopped,
    JobSink,
    Progress,
    error_text,
)

log = logging.getLogger(__name__)

PROGRAM = "nix-eval-jobs"


def available() -> str | None:
    return shutil.which(PROGRAM)


@functools.lru_cache(maxsize=8)
def _flags(program: str, mtime_ns: int) -> frozenset[str]:
    """The long options ``program --help`` lists (cached per binary and version)."""
    try:
        found = run_process([program, "--help"], timeout=30)
    except OSError:
        return frozenset()
    return frozenset(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", found.stdout + found.stderr))


def supports(program: str, flag: str) -> bool:
    """Whether this nix-eval-jobs knows ``flag``: options were added over its releases
    (``--constituents`` in 2.25), and an unknown one fails the whole run."""
    try:
        mtime_ns = os.stat(program).st_mtime_ns
    except OSError:
        return False
    return flag in _flags(program, mtime_ns)


def probe(spec: EvalSpec, should_stop: Callable[[], bool] | None = None) -> list[str]:
    """Check the jobset's root and return the attribute path to evaluate."""
    expr_file = spec.run_dir / "probe.nix"
    expr_file.write_text(f"""
let r = {spec.root_expression()};
in
  if !(builtins.isAttrs r.root) then
    throw "${{r.rootName}} is a ${{builtins.typeOf r.root}}, not an attribute set of jobs"
  else if (r.root.type or null) == "derivation" then
    throw "${{r.rootName}} is a single derivation, not an attribute set of jobs"
  else r.attrPath
""")
    out: list[str] = []

    def on_stdout(line: str) -> bool:
        out.append(line)
        return True

    try:
        finished = proc.stream(
            ["nix-instantiate", "--eval", "--strict", "--json", *spec.nix_options(),
             # restricted mode reads only -I paths: this one holds just probe.nix
             "-I", f"circus-run={spec.run_dir}", str(expr_file)],
            env=spec.env, cwd=str(spec.run_dir), deadline=spec.deadline,
            should_stop=should_stop, on_stdout=on_stdout)
    except proc.Stopped as stop:
        raise EvalStopped(stop.reason, stop.tail) from None
    if finished.returncode != 0:
        raise EvalFailed(error_text(finished.stderr_tail), finished.stderr_tail)
    value = json.loads("\n".join(out) or "null")
    return [str(v) for v in value] if isinstance(value, list) else []


def command(spec: EvalSpec, attr_path: list[str], program: str) -> list[str]:
    argv = [program, "--gc-roots-dir", str(spec.gc_roots_dir),
            "--workers", str(spec.workers), "--max-memory-size", str(spec.max_memory_size),
            "--meta", "--force-recurse"]
    # without it the aggregates' constituents come from their .drv files (Job.constituents_from_drv)
    if supports(program, "--constituents"):
        argv.append("--constituents")
    if spec.flake_ref is not None:
        argv += ["--flake", f"{spec.flake_ref}#{attr_name(attr_path)}"]
    else:
        assert spec.file is not None
        for arg in spec.args:
            if arg.kind == "str":
                argv += ["--argstr", arg.name, arg.value]
            else:
                argv += ["--arg", arg.name, arg.value]
        argv.append(spec.file)
    return argv + spec.nix_options()


def evaluate(spec: EvalSpec, progress: Progress, sink: JobSink, *, program: str,
             should_stop: Callable[[], bool] | None = None) -> EvalResult:
    """Evaluate ``spec``; jobs go to ``sink`` as they come (the caller closes it)."""
    attr_path = probe(spec, should_stop)
    job_count = 0
    errors: list[JobError] = []

    def on_stdout(line: str) -> bool:
        nonlocal job_count
        line = line.strip()
        if not line.startswith("{"):
            return True
        try:
            record: dict[str, Any] = json.loads(line)
            item = job_from_record(record)
        except (ValueError, RecordError) as exc:
            log.warning("ignoring a line of %s: %s", PROGRAM, exc)
            return True
        if isinstance(item, JobError):
            errors.append(item)
        else:
            job_count += 1
            sink.submit(item)
        progress.done += 1
        progress.total = progress.done
        return False

    spec.gc_roots_dir.mkdir(parents=True, exist_ok=True)
    try:
        finished = proc.stream(command(spec, attr_path, program), env=spec.env,
                               cwd=str(spec.run_dir), deadline=spec.deadline,
                               should_stop=should_stop, on_stdout=on_stdout)
    except proc.Stopped as stop:
        raise EvalStopped(stop.reason, stop.tail) from None
    if finished.returncode != 0:
        raise EvalFailed(error_text(finished.stderr_tail), finished.stderr_tail)
    return EvalResult(job_count=job_count, errors=errors, attr_path=attr_path, program=PROGRAM)
