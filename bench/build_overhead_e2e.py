"""End-to-end mode of ``bench/build_overhead.py`` (``--e2e``): trigger over the API → all built.

Circus side: one ``circus up`` instance (private PostgreSQL and Redis, server,
evaluator, queue runner with its defaults: two local workers), a project whose
repository is a local git repository holding the DAG as a classic expression
(``default.nix``, every derivation a job), and a jobset on it. Every round
commits a new nonce (nothing is cached), triggers the jobset with
``POST /api/v1/evaluations/trigger`` and waits until the evaluation has
finished and every one of its builds has too; the clock runs from the request
to that moment, so fetching and evaluating are included.

After each round the benchmark waits for the post-processing (cache publishing,
closure sizes, GC roots), which runs after the builds; its CPU counts for the
round, its time does not.

``--reference <checkout>`` runs a second ``circus up`` of another checkout (the
main branch, say) through the same rounds, the two taking turns after the
baseline: the only fair before/after on a shared host. ``--set-circus`` gives
this checkout's instance settings the reference does not get (a setting
against the same code).

Baseline: ``nix-build -j2`` of a copy of the same files with another fresh
nonce: it evaluates the same expression and builds the same number of fresh
derivations from the same empty starting state (same store, no substituters).
It builds with the host's nix.conf sandbox setting (``sandbox = false`` on the
development host) unless ``--baseline-sandbox`` gives it Circus's default
sandbox, in which every Circus build runs: on the 2-core host the sandbox costs
~10 ms of system CPU a build, ~5 s of nix-build's ~14 s for the 500 derivations
(8.7 s without), and about doubles its wall time (2026-12, loaded host).

``--nix-calls`` puts a wrapper for each Nix command first on the instances'
``PATH``: every call the daemons make (the batches' ``nix-store --realise``,
queries, GC roots, evaluation) is logged with its CPU (``times`` of the real
command, its builders included), and each round prints the CPU per kind of
call. The wrapper's own shell costs a few ms a call: leave it off for timings.

Each round prints both times, the ratio, and (``--verbose``) a timeline from
the database's timestamps: trigger → evaluation started → builds committed →
first step queued → first step started → last step finished → last build
finished, plus how much of the building phase the two slots were idle while a
step was ready (queued, not started).
"""

from __future__ import annotations

import os
import secrets
import shutil
import statistics
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import create_engine, text

from circus.common.db import normalise_url
from circus.common.enums import EvaluationStatus
from circus.common.localservices import PrivatePostgres
from circus.common.statussql import UNFINISHED
from tests.helpers.circus_up import Client, remove_instance, start
from tests.helpers.daemons import Daemon
from tests.helpers.net import free_port

#: the checkout this benchmark belongs to
CHECKOUT = Path(__file__).resolve().parents[1]
GIT_ENV = {"GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@localhost",
           "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@localhost"}
#: evaluation statuses after which no build of it will appear any more
DONE_EVALUATION = {EvaluationStatus.completed.value, EvaluationStatus.failed.value,
                   EvaluationStatus.cancelled.value, EvaluationStatus.timed_out.value}


#: ``--nix-calls``: runs the real command, then appends its CPU (user and system of it
#: and its reaped children, as bash's ``times`` prints them) and arguments to the log
NIX_CALL_WRAPPER = """#!/bin/bash
name=$(basename "$0")
{real}/"$name" "$@"
rc=$?
times > {log}.$$
args="$*"
printf '%s\\t%s\\t%s\\n' "$name" "$(tail -1 {log}.$$)" "${{args:0:400}}" >> {log}
rm -f {log}.$$
exit $rc
"""
NIX_COMMANDS = ("nix", "nix-store", "nix-instantiate", "nix-build", "nix-env", "nix-eval-jobs")


def nix_call_wrappers(directory: Path) -> tuple[Path, Path]:
    """(a directory of wrappers for the Nix commands found on ``PATH``, their log)."""
    bin_dir, log = directory / "bin", directory / "calls.tsv"
    bin_dir.mkdir(parents=True)
    for command in NIX_COMMANDS:
        found = shutil.which(command)
        if found is None:
            continue
        wrapper = bin_dir / command
        # the real directory, not the command's target: nix-store is a link to nix and
        # tells what it is by the name it was called with
        wrapper.write_text(NIX_CALL_WRAPPER.format(real=Path(found).parent, log=log))
        wrapper.chmod(0o755)
    return bin_dir, log


def nix_call_kind(name: str, args: str) -> str:
    """A call's kind: the command, its subcommand and its first options."""
    words = args.split()
    if name == "nix":
        return " ".join([name, *words[:1], *[w for w in words[1:4] if w.startswith("-")]])
    if name == "nix-store" and "--keep-going" in words:
        return "nix-store --realise (a batch)"
    return " ".join([name, *[w for w in words[:3] if w.startswith("-")]])


def nix_call_cpu(log: Path) -> dict[str, tuple[int, float]]:
    """kind -> (calls, CPU seconds) from a wrapper log, which is emptied."""
    def seconds(text: str) -> float:
        minutes, _, rest = text.partition("m")
        return int(minutes) * 60 + float(rest.rstrip("s"))

    found: dict[str, tuple[int, float]] = {}
    if not log.exists():
        return found
    for line in log.read_text().splitlines():
        name, cpu, args = [*line.split("\t"), "", ""][:3]
        try:
            user, system = cpu.split()
            spent = seconds(user) + seconds(system)
        except ValueError:
            continue
        kind = nix_call_kind(name, args)
        calls, total = found.get(kind, (0, 0.0))
        found[kind] = (calls + 1, total + spent)
    log.write_text("")
    return found


def write_expression(directory: Path, dag: str, shape: dict[str, int]) -> None:
    """``dag.nix`` (the DAG function) and ``default.nix`` applying it to a new nonce."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "dag.nix").write_text(dag)
    args = " ".join(f"{key} = {value};" for key, value in shape.items())
    (directory / "default.nix").write_text(
        f'import ./dag.nix {{ nonce = "{secrets.token_hex(8)}"; {args} }}\n')


@dataclass
class Round:
    seconds: float
    evaluation_id: int
    builds: int
    statuses: dict[int, int]
    timeline: dict[str, float]
    idle_ready_secs: float
    step_secs: float
    steps: int


class UpInstance:
    """``circus up`` in a scratch directory, with the DAG's project and jobset."""

    def __init__(self, root: Path, dag: str, shape: dict[str, int],
                 extra_env: dict[str, str], code: Path | None = None) -> None:
        self.root = root
        #: another checkout whose Circus this instance runs (``--reference``)
        self.code = code
        self.state = root / "state"
        self.repo = root / "repo"
        self.dag = dag
        self.shape = shape
        self.extra_env = extra_env
        self.port = free_port()
        self.daemon: Daemon | None = None
        #: write each round's steps to ``steps-<evaluation id>.tsv`` under ``root``
        self.keep_steps = False
        #: CPU seconds per kind of process during the last round (post-processing included)
        self.last_cpu: dict[str, float] = {}
        #: seconds from the last round's trigger until its post-processing was done
        self.post_processed = 0.0
        #: ``--nix-calls``: the wrappers' log (None: no wrappers)
        self.nix_calls: Path | None = None

    def start(self, nix_calls: bool = False) -> None:
        extra_env = dict(self.extra_env)
        if nix_calls:
            bin_dir, self.nix_calls = nix_call_wrappers(self.root / "nix-calls")
            extra_env["PATH"] = f"{bin_dir}:{os.environ.get('PATH', '')}"
        if self.code is not None:
            extra_env["PYTHONPATH"] = str(self.code)
        self.daemon, password, _ = start(self.state, self.port, self.root, extra_env)
        self.api = Client(f"http://127.0.0.1:{self.port}", password)
        url = PrivatePostgres(self.state / "postgres").url("circus")
        self.engine = create_engine(normalise_url(url))
        self._create_jobset()
        self._wait_idle()

    def _create_jobset(self) -> None:
        write_expression(self.repo, self.dag, self.shape)
        for argv in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"],
                     ["git", "commit", "-q", "-m", "DAG"]):
            subprocess.run(argv, cwd=self.repo, check=True, env={**os.environ, **GIT_ENV})
        self.api.post("/api/v1/projects", {
            "name": "bench", "repository_url": f"file://{self.repo}"})
        # no scheduled checks: only the benchmark's triggers evaluate
        self.api.post("/api/v1/projects/bench/jobsets", {
            "name": "dag", "flake_mode": False, "nix_expression": "default.nix",
            "branch": "main", "check_interval": 0})

    def _wait_idle(self, timeout: float = 300) -> None:
        """Until the demo project's first evaluation and builds are done."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.engine.connect() as conn:
                busy = conn.execute(text(f"""
                    SELECT (SELECT count(*) FROM evaluations
                            WHERE status IN ('pending', 'running'))
                         + (SELECT count(*) FROM builds WHERE status IN {UNFINISHED})
                """)).scalar_one()
            if not busy:
                return
            time.sleep(0.5)
        raise TimeoutError("the instance did not become idle")

    def cpu_roots(self) -> list[int]:
        """``circus up`` and the postmaster (pg_ctl detaches it from ``circus up``)."""
        assert self.daemon is not None
        postmaster = PrivatePostgres(self.state / "postgres").data_dir / "postmaster.pid"
        return [self.daemon.pid, int(postmaster.read_text().split()[0])]

    def new_revision(self) -> None:
        write_expression(self.repo, self.dag, self.shape)
        subprocess.run(["git", "commit", "-qam", "new nonce"], cwd=self.repo, check=True,
                       env={**os.environ, **GIT_ENV})

    def run_round(self, expected: int, timeout: float = 900) -> Round:
        self.new_revision()
        cpu_before = tree_cpu(self.cpu_roots())
        triggered_at = time.time()
        start = time.monotonic()
        evaluation = self.api.post("/api/v1/evaluations/trigger",
                                   {"project": "bench", "jobset": "dag"})
        evaluation_id = int(evaluation["id"])
        deadline = start + timeout
        # The poll runs every 20 ms on the PostgreSQL being measured, so it must be
        # cheap: counting the evaluation's unfinished builds each time cost ~1.4 ms a
        # poll, ~2 s of PostgreSQL CPU per round charged to Circus. An unfinished
        # build is found through ix_builds_status_priority, and nothing is counted.
        with self.engine.connect() as conn:
            while True:
                status, unfinished = conn.execute(text(f"""
                    SELECT e.status, EXISTS (
                        SELECT 1 FROM builds b
                        JOIN evaluation_builds eb ON eb.build_id = b.id
                        WHERE eb.evaluation_id = e.id AND b.status IN {UNFINISHED})
                    FROM evaluations e WHERE e.id = :id"""), {"id": evaluation_id}).one()
                conn.rollback()
                if status in DONE_EVALUATION and not unfinished:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"evaluation {evaluation_id}: {status}, "
                                       f"builds unfinished: {unfinished}")
                time.sleep(0.02)
        seconds = time.monotonic() - start
        # cache publishing, closure sizes and GC roots follow the builds (and wait while
        # the slots build): the next round starts once they are done, and their CPU
        # counts for this round
        self.post_processed = self._wait_post_processed(deadline) - start
        cpu_after = tree_cpu(self.cpu_roots())
        self.last_cpu = {k: v - cpu_before.get(k, 0.0) for k, v in cpu_after.items()}
        with self.engine.connect() as conn:
            builds = conn.execute(text(
                "SELECT count(*) FROM evaluation_builds WHERE evaluation_id = :id"),
                {"id": evaluation_id}).scalar_one()
        if status != EvaluationStatus.completed.value or builds != expected:
            raise RuntimeError(f"evaluation {evaluation_id} ended {status} with {builds} "
                               f"builds ({expected} expected); see {self.root}/circus-up-*.log")
        return self._timeline(evaluation_id, triggered_at, seconds, builds)

    def _wait_post_processed(self, deadline: float) -> float:
        """Until no build waits for post-processing; returns when (monotonic)."""
        with self.engine.connect() as conn:
            while conn.execute(text("SELECT EXISTS (SELECT 1 FROM pending_postprocessing)")
                               ).scalar_one():
                conn.rollback()
                if time.monotonic() > deadline:
                    raise TimeoutError("post-processing did not finish")
                time.sleep(0.1)
        return time.monotonic()

    def _timeline(self, evaluation_id: int, triggered_at: float, seconds: float,
                  builds: int) -> Round:
        with self.engine.connect() as conn:
            evaluation = conn.execute(text("""
                SELECT created_at, started_at, finished_at FROM evaluations WHERE id = :id
            """), {"id": evaluation_id}).one()
            build_rows = conn.execute(text("""
                SELECT b.status, b.stepped_at, b.completed_at FROM builds b
                JOIN evaluation_builds eb ON eb.build_id = b.id WHERE eb.evaluation_id = :id
            """), {"id": evaluation_id}).all()
            steps = conn.execute(text("""
                SELECT DISTINCT s.id, s.created_at, s.queued_at, s.started_at, s.finished_at,
                       s.worker, s.drv_path
                FROM steps s JOIN build_steps bs ON bs.step_id = s.id
                JOIN evaluation_builds eb ON eb.build_id = bs.build_id
                WHERE eb.evaluation_id = :id"""), {"id": evaluation_id}).all()

        def since(moment: datetime | None) -> float:
            return moment.timestamp() - triggered_at if moment is not None else float("nan")

        if self.keep_steps:
            # one line per step, by start: where a round's time went, step by step
            with (self.root / f"steps-{evaluation_id}.tsv").open("w") as out:
                for step in sorted(steps, key=lambda s: since(s.started_at or s.finished_at)):
                    out.write(f"{step.id}\t{since(step.created_at):.3f}\t"
                              f"{since(step.queued_at):.3f}\t{since(step.started_at):.3f}\t"
                              f"{since(step.finished_at):.3f}\t{step.worker}\t"
                              f"{step.drv_path[44:]}\n")
        statuses: dict[int, int] = {}
        for row in build_rows:
            statuses[row.status] = statuses.get(row.status, 0) + 1
        timeline = {
            "evaluation created": since(evaluation.created_at),
            "evaluation started": since(evaluation.started_at),
            "builds committed": since(evaluation.finished_at),
            "first build stepped": since(min((r.stepped_at for r in build_rows
                                              if r.stepped_at), default=None)),
            "last build stepped": since(max((r.stepped_at for r in build_rows
                                             if r.stepped_at), default=None)),
            "first step queued": since(min((s.queued_at for s in steps if s.queued_at),
                                           default=None)),
            "first step started": since(min((s.started_at for s in steps if s.started_at),
                                            default=None)),
            "last step finished": since(max((s.finished_at for s in steps if s.finished_at),
                                            default=None)),
            "last build finished": since(max((r.completed_at for r in build_rows
                                              if r.completed_at), default=None)),
        }
        idle, busy = idle_with_work_ready(
            # look-ahead steps are claimed before they are queued: ready when started
            [(since(s.queued_at or s.started_at), since(s.started_at), since(s.finished_at))
             for s in steps if s.started_at and s.finished_at])
        return Round(seconds, evaluation_id, builds, statuses, timeline, idle, busy, len(steps))

    def stop(self) -> None:
        if getattr(self, "engine", None) is not None:
            self.engine.dispose()
        if self.daemon is not None:
            self.daemon.stop(timeout=90)


def idle_with_work_ready(steps: list[tuple[float, float, float]], slots: int = 2
                         ) -> tuple[float, float]:
    """(slot-seconds a slot was free while a step was ready, slot-seconds of building).

    ``steps`` are (queued, started, finished) times. A step is ready from queued to
    started; at any moment ``min(slots - running, ready)`` slots are idle for want
    of claiming, not for want of work. Steps of one ``nix-store`` batch count as
    running from their own start (Nix's), so a batch's serial chain shows as ready.
    """
    events: list[tuple[float, int, int]] = []
    for queued, started, finished in steps:
        events += [(queued, 0, +1), (started, 0, -1), (started, +1, 0), (finished, -1, 0)]
    events.sort()
    idle = busy = 0.0
    running = ready = 0
    previous = events[0][0] if events else 0.0
    for moment, d_running, d_ready in events:
        span = moment - previous
        idle += span * max(0, min(slots - running, ready))
        busy += span * min(slots, running)
        running += d_running
        ready += d_ready
        previous = moment
    return idle, busy


def tree_cpu(roots: list[int]) -> dict[str, float]:
    """CPU seconds (user + system, with reaped children) of ``roots`` and their
    descendants, by what they are: the Circus daemons, PostgreSQL, Redis, and the
    Nix processes the queue runner and the evaluator started (a reaped one counts
    for its parent)."""
    tick = os.sysconf("SC_CLK_TCK")
    processes: dict[int, tuple[int, str, float, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError):
            continue
        processes[int(entry.name)] = (
            int(fields[1]), " ".join(a.decode(errors="replace") for a in argv[:3]),
            (int(fields[11]) + int(fields[12])) / tick, (int(fields[13]) + int(fields[14])) / tick)
    children: dict[int, list[int]] = {}
    for pid, (ppid, *_) in processes.items():
        children.setdefault(ppid, []).append(pid)
    found: dict[str, float] = {}
    todo = [r for r in roots if r in processes]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        _, command, own, reaped = processes[pid]
        name = next((d for d in ("queue-runner", "evaluator", "server") if d in command),
                    "postgres" if "postgres" in command else
                    "redis" if "redis" in command else
                    "nix" if "nix" in command else "other")
        if name in ("queue-runner", "evaluator"):
            # nix-store (builds) and evaluations the daemon started and reaped
            found[f"{name} children"] = found.get(f"{name} children", 0.0) + reaped
            reaped = 0.0
        found[name] = found.get(name, 0.0) + own + reaped
    return found


def nix_build(directory: Path, env: dict[str, str]) -> tuple[float, float]:
    """(seconds, CPU seconds) of ``nix-build -j2`` over the expression."""
    before = os.times()
    start = time.monotonic()
    subprocess.run(["nix-build", "-j2", "--no-out-link", str(directory / "default.nix")],
                   check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    after = os.times()
    return time.monotonic() - start, (after.children_user + after.children_system
                                      - before.children_user - before.children_system)


def nix_instantiate(directory: Path, env: dict[str, str]) -> float:
    """Seconds ``nix-instantiate`` takes over the expression (evaluation alone)."""
    start = time.monotonic()
    subprocess.run(["nix-instantiate", str(directory / "default.nix")], check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.monotonic() - start


def run(dag: str, shape: dict[str, int], rounds: int, env: dict[str, str],
        extra_env: dict[str, str], verbose: bool, keep_state: bool,
        reference: Path | None = None, own_env: dict[str, str] | None = None,
        nix_calls: bool = False) -> int:
    total = shape["chains"] * shape["length"] + shape["fans"] + 1
    root = Path(os.environ.get("BENCH_TMPDIR", "/tmp"))
    root = Path(__import__("tempfile").mkdtemp(prefix="circus-bench-e2e-", dir=root))
    root.chmod(0o755)  # the postgres user must reach its data directory
    print(f"end to end: DAG of {total} derivations ({shape}), every one a job; "
          f"rounds: {rounds}" + (f"; reference: {reference}" if reference else "")
          + (f"; this checkout's instance only: {own_env}" if own_env else "")
          + ("; nix-build in the sandbox" if "sandbox = true" in env.get("NIX_CONFIG", "")
             else "; nix-build without the sandbox (Circus's builds are in it)"), flush=True)
    # this checkout's code, named: ``circus up`` runs in its state directory, where a
    # relative PYTHONPATH (``PYTHONPATH=.``) no longer points here and the installed
    # package (another checkout, with an editable install) would be measured instead
    instances = {"circus": UpInstance(root / "circus", dag, shape,
                                      {**extra_env, **(own_env or {})}, code=CHECKOUT)}
    if reference is not None:
        instances["reference"] = UpInstance(root / "reference", dag, shape, extra_env,
                                            code=reference)
    #: per round: nix-build's seconds and CPU seconds, and each instance's round
    rows: list[tuple[float, float, dict[str, Round]]] = []
    #: instance -> Circus's CPU seconds per round
    cpu: dict[str, list[float]] = {label: [] for label in instances}
    try:
        for instance in instances.values():
            instance.root.mkdir()
            instance.root.chmod(0o755)
            instance.keep_steps = keep_state
            instance.start(nix_calls)
        for number in range(rounds):
            # the baseline first, with a fresh nonce of its own: same work, same start
            baseline_dir = root / f"baseline-{number}"
            write_expression(baseline_dir, dag, shape)
            eval_alone = nix_instantiate(baseline_dir, env) if verbose else float("nan")
            write_expression(baseline_dir, dag, shape)
            base, base_cpu = nix_build(baseline_dir, env)
            results: dict[str, Round] = {}
            # the two checkouts take turns going first after the baseline
            order = list(instances) if number % 2 == 0 else list(reversed(instances))
            for label in order:
                results[label] = instances[label].run_round(total)
                cpu[label].append(sum(instances[label].last_cpu.values()))
            rows.append((base, base_cpu, results))
            print(f"  round {number + 1}: nix-build -j2 {base:.2f} s | " + " | ".join(
                f"{label} {r.seconds:.2f} s = {r.seconds / base:.2f}x"
                for label, r in results.items()), flush=True)
            if verbose:
                for label, instance in instances.items():
                    print(f"    {label}:")
                    print_timeline(results[label], eval_alone)
                    by_kind = "  ".join(f"{k} {v:.1f}" for k, v in
                                        sorted(instance.last_cpu.items()) if v >= 0.05)
                    print(f"    CPU s: nix-build -j2 {base_cpu:.1f} | {label} "
                          f"{cpu[label][-1]:.1f} (until post-processing was done, "
                          f"{instance.post_processed:.2f} s after the trigger): {by_kind}",
                          flush=True)
            for label, instance in instances.items():
                if instance.nix_calls is not None:
                    calls = nix_call_cpu(instance.nix_calls)
                    print(f"    {label}'s Nix calls (calls, CPU s): " + "; ".join(
                        f"{kind} {n}, {spent:.2f}" for kind, (n, spent) in
                        sorted(calls.items(), key=lambda item: -item[1][1])), flush=True)
    finally:
        for instance in instances.values():
            instance.stop()
        if keep_state:
            print(f"state kept in {root}")
        else:
            # the clusters too, which live outside ``root`` when BENCH_TMPDIR is out of the
            # postgres user's reach (/var/lib/circus/postgres-<digest>)
            for instance in instances.values():
                remove_instance(instance.state)
            shutil.rmtree(root, ignore_errors=True)
    print(f"\nnix-build -j2: median {statistics.median(b for b, _, _ in rows):.2f} s, "
          f"CPU seconds median {statistics.median(c for _, c, _ in rows):.1f}")
    for label in instances:
        ratios = [r[label].seconds / base for base, _, r in rows]
        print(f"{label} end to end: median "
              f"{statistics.median(r[label].seconds for _, _, r in rows):.2f} s; ratio median "
              f"{statistics.median(ratios):.2f}x (min {min(ratios):.2f}, max {max(ratios):.2f}; "
              f"target <= 1.2x)")
        # on a busy machine the wall-clock ratio follows how the kernel shares the cores
        # among many processes; the CPU both sides spent does not
        print(f"  CPU seconds (every daemon, PostgreSQL, Redis, their Nix processes, until "
              f"post-processing was done) median {statistics.median(cpu[label]):.1f}")
    if reference is not None:
        relative = [r["circus"].seconds / r["reference"].seconds for _, _, r in rows]
        print(f"circus / reference per round: median {statistics.median(relative):.2f}x "
              f"(min {min(relative):.2f}, max {max(relative):.2f})")
    return 0


def print_timeline(result: Round, eval_alone: float) -> None:
    marks = "  ".join(f"{name} {at:.2f}" for name, at in result.timeline.items())
    print(f"    timeline (s after the trigger): {marks}")
    span = result.timeline["last step finished"] - result.timeline["first step started"]
    print(f"    nix-instantiate alone {eval_alone:.2f} s; {result.steps} steps, building "
          f"{span:.2f} s, slots busy {result.step_secs:.2f} slot-s "
          f"({result.step_secs / max(span * 2, 1e-9):.0%}), idle with a step ready "
          f"{result.idle_ready_secs:.2f} slot-s; builds {result.statuses}", flush=True)
