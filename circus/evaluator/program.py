"""What to evaluate and how the outcome looks, shared by both evaluation programs."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from queue import SimpleQueue

from circus.evaluator.jobs import Job, JobError, attr_name, read_facts

WALK_NIX = Path(__file__).with_name("walk.nix")


class EvalFailed(Exception):
    """The evaluation as a whole failed (syntax error, missing attribute, crash)."""

    def __init__(self, message: str, stderr_tail: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.stderr_tail = stderr_tail


class EvalStopped(Exception):
    """Timed out (``reason == "timeout"``) or cancelled."""

    def __init__(self, reason: str, stderr_tail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.stderr_tail = stderr_tail


def nix_string(value: str) -> str:
    """A Nix string literal."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("${", "\\${")
    return f'"{escaped}"'


def nix_attr_name(name: str) -> str:
    import re

    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_'-]*", name):
        return name
    return nix_string(name)


@dataclass(frozen=True)
class ClassicArg:
    """One argument of a classic jobset's function: a string or a Nix expression."""

    name: str
    kind: str  # "str" | "expr"
    value: str

    def as_nix(self) -> str:
        return nix_string(self.value) if self.kind == "str" else f"({self.value})"


@dataclass
class EvalSpec:
    """A jobset ready to evaluate: what (flake or file) and with which limits."""

    #: flake mode: a locked flake reference and the attribute path inside it
    flake_ref: str | None = None
    attr_path: list[str] = field(default_factory=lambda: ["hydraJobs"])
    #: the default ``hydraJobs`` falls back to ``checks`` when the flake has none
    fallback_to_checks: bool = False
    #: how users know the flake (its repository), for error messages
    display_name: str = ""
    #: classic mode: the expression file and its arguments
    file: str | None = None
    args: list[ClassicArg] = field(default_factory=list)
    #: -I name=path entries (input store paths; allowed paths under restrict-eval)
    include: dict[str, str] = field(default_factory=dict)
    restrict_eval: bool = False
    allowed_uris: list[str] = field(default_factory=list)
    allow_ifd: bool = False
    workers: int = 1
    max_memory_size: int = 4096
    #: per-evaluation scratch directory (expression files, skip lists)
    run_dir: Path = Path(".")
    #: nix-eval-jobs --gc-roots-dir; the fallback puts one root here
    gc_roots_dir: Path = Path(".")
    env: dict[str, str] = field(default_factory=dict)
    #: time.monotonic() after which the run is stopped
    deadline: float | None = None

    @property
    def flake_mode(self) -> bool:
        return self.flake_ref is not None

    def nix_options(self) -> list[str]:
        options: list[str] = []
        for name, path in sorted(self.include.items()):
            options += ["-I", f"{name}={path}"]
        if self.restrict_eval:
            options += ["--option", "restrict-eval", "true"]
        if self.allowed_uris:
            options += ["--option", "allowed-uris", " ".join(self.allowed_uris)]
        if not self.allow_ifd:
            options += ["--option", "allow-import-from-derivation", "false"]
        return options

    def root_expression(self) -> str:
        """A Nix expression for ``{ root; rootName; attrPath; }``: the jobs and their name.

        Missing attributes and import errors surface as readable Nix errors.
        """
        if self.flake_ref is not None:
            path = self.attr_path
            shown = attr_name(path)
            where = self.display_name or self.flake_ref
            missing = (f"flake {where} provides neither '{shown}' nor 'checks'"
                       if self.fallback_to_checks
                       else f"flake {where} does not provide attribute '{shown}'")
            checks = ('let c = pick [ "checks" ]; in if c.found then '
                      '{ root = c.value; rootName = "\'checks\'"; attrPath = [ "checks" ]; } else '
                      if self.fallback_to_checks else "")
            return f"""
let
  flake = builtins.getFlake {nix_string(self.flake_ref)};
  pick = path: builtins.foldl'
    (acc: n: if acc.found && builtins.isAttrs acc.value && acc.value ? ${{n}}
             then {{ found = true; value = acc.value.${{n}}; }}
             else {{ found = false; value = null; }})
    {{ found = true; value = flake; }} path;
  primary = pick {nix_list(path)};
in
  if primary.found
  then {{ root = primary.value; rootName = {nix_string(repr_attr(shown))};
         attrPath = {nix_list(path)}; }}
  else {checks}throw {nix_string(missing)}
"""
        assert self.file is not None
        args = "\n".join(f"    {nix_attr_name(a.name)} = {a.as_nix()};" for a in self.args)
        return f"""
let
  f = import {nix_string(self.file)};
  args = {{
{args}
  }};
  formals = builtins.functionArgs f;
in {{
  root =
    if builtins.isFunction f
    then f (if formals == {{ }} then args else builtins.intersectAttrs formals args)
    else f;
  rootName = "the result of the jobset's expression";
  attrPath = [ ];
}}
"""


def repr_attr(shown: str) -> str:
    return f"'{shown}'"


def nix_list(items: list[str]) -> str:
    return "[ " + " ".join(nix_string(i) for i in items) + " ]"


@dataclass
class EvalResult:
    #: how many jobs went to the sink (the jobs themselves are the importer's)
    job_count: int
    errors: list[JobError]
    #: the attribute path that was evaluated (``checks`` when hydraJobs was missing)
    attr_path: list[str]
    program: str


class Progress:
    """Counts what the program reported so far; read by the progress reporter."""

    def __init__(self) -> None:
        self.total = 0
        self.done = 0


#: jobs handed to the sink thread at once (fewer thread wake-ups per job)
CHUNK = 256


class JobSink:
    """Takes jobs as the program reports them and, in a background thread, reads
    their .drv facts and hands them on in batches (to the build importer), so the
    import runs while Nix is still evaluating."""

    def __init__(self, consumer: Callable[[list[Job]], None] | None = None,
                 batch_size: int = 2000) -> None:
        self.consumer = consumer
        self.batch_size = batch_size
        #: jobs received (the sink holds none once they are handed on: at 50,000 jobs
        #: a second copy of every Job costs as much as the evaluator's whole import)
        self.count = 0
        self.error: BaseException | None = None
        self._pending: list[Job] = []
        self._queue: SimpleQueue[list[Job] | None] = SimpleQueue()
        self._thread = threading.Thread(target=self._run, daemon=True, name="job-sink")
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Called from one thread (the program's output reader)."""
        self._pending.append(job)
        if len(self._pending) >= CHUNK:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            self._queue.put(self._pending)
            self._pending = []

    def _run(self) -> None:
        batch: list[Job] = []
        while True:
            chunk = self._queue.get()
            if chunk is not None:
                if self.error is not None:
                    continue  # drain after a failure
                for job in chunk:
                    if job.facts is None:
                        job.facts = read_facts(job.drv_path)
                    job.constituents_from_drv()
                self.count += len(chunk)
                batch.extend(chunk)
                # full batches only: nothing commits before the end anyway, and
                # fewer, larger COPYs cost less
                if len(batch) < self.batch_size:
                    continue
            if batch and self.consumer is not None and self.error is None:
                try:
                    self.consumer(batch)
                except BaseException as exc:
                    self.error = exc
            batch = []
            if chunk is None:
                return

    def close(self) -> int:
        """Flush, wait, re-raise the consumer's error; return how many jobs it received."""
        self.flush()
        self._queue.put(None)
        self._thread.join()
        if self.error is not None:
            raise self.error
        return self.count


StopCheck = Callable[[], bool]


def remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def error_text(stderr: str) -> str:
    """The ``error: ...`` part of Nix's stderr (without the --show-trace hint)."""
    lines = stderr.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("error:")), None)
    if start is None:
        text = "\n".join(line for line in lines if line.strip())
    else:
        text = "\n".join(lines[start:])
    text = "\n".join(line for line in text.splitlines()
                     if "use '--show-trace'" not in line).strip()
    return text[-8000:] or "the evaluation program failed without an error message"


def dump_json(path: Path, value: object) -> None:
    path.write_text(json.dumps(value))
