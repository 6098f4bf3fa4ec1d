"""Evaluation import benchmark: N trivial derivations, trigger -> builds committed.

For each N it measures, on fresh (never instantiated) derivations:

  (a) Nix alone: ``nix-instantiate`` of the flake's ``hydraJobs`` (writes every .drv)
  (b) Circus: ``trigger()`` + the evaluation task, until every build is committed

and prints the import rate (builds per second of the import step itself), the
rate beyond Nix's own time (N / (b - a)) and the ratio b/a. Hydra's importer
manages about 80 builds/s.

Memory: peak resident memory of each side, sampled every 50 ms: (a) the
nix-instantiate process; (b) every Nix process the evaluation runs plus what
this (evaluator) process grows by during it — the interpreter and libraries it
held before the trigger are the evaluator daemon's, not the evaluation's (their
size is printed as "py base"). PostgreSQL is not counted on either side.

Usage: python bench/eval_import.py [--repeat=R] [N ...]   (default: 1000 10000 50000)

"cpu" columns add up Nix, this process and the PostgreSQL server (private cluster
only): N / (cpu b - cpu a) is the import's throughput per CPU-second, which
stays meaningful on a busy machine where wall-clock ratios do not.
Uses $CIRCUS_BENCH_DATABASE_URL (a server URL; a scratch database is created on
it) or a private PostgreSQL in a temporary directory.
"""

from __future__ import annotations

import os
import resource
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from circus.cli.migrate import upgrade  # noqa: E402
from circus.common.celery import create_celery_app  # noqa: E402
from circus.common.config import load_settings  # noqa: E402
from circus.common.db import normalise_url  # noqa: E402
from circus.common.enums import EvaluationStatus, TriggerKind  # noqa: E402
from circus.common.localservices import PrivatePostgres  # noqa: E402
from circus.common.models import Evaluation, Jobset, Project  # noqa: E402
from circus.common.nix.environment import current_system  # noqa: E402
from circus.evaluator import execution, service  # noqa: E402
from circus.evaluator.importer import BuildImporter  # noqa: E402
from circus.evaluator.jobs import DrvFacts, Job  # noqa: E402

GIT_ENV = {"GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@circus.invalid",
           "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@circus.invalid"}


def flake_text(count: int, salt: str) -> str:
    return f"""{{
  outputs = {{ self }}: {{
    hydraJobs = builtins.listToAttrs (builtins.genList (i: {{
      name = "job${{toString i}}";
      value = derivation {{
        name = "bench-${{toString i}}";
        system = "{current_system()}";
        builder = "/bin/sh";
        args = [ "-c" "echo {salt} ${{toString i}} > $out" ];
      }};
    }}) {count});
  }};
}}
"""


def git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                          env={**os.environ, **GIT_ENV}, check=True)
    return done.stdout.strip()


def commit_flake(repo: Path, count: int) -> str:
    (repo / "flake.nix").write_text(flake_text(count, secrets.token_hex(8)))
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", f"{count} jobs")
    return git(repo, "rev-parse", "HEAD")


def cpu_seconds(pg_dir: Path | None) -> tuple[float, float, float]:
    """(children, this process, PostgreSQL server) CPU seconds so far."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    me = resource.getrusage(resource.RUSAGE_SELF)
    pg = 0.0
    if pg_dir is not None:
        tick = os.sysconf("SC_CLK_TCK")
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if str(pg_dir) not in (entry / "cmdline").read_bytes().decode(
                        errors="replace") and not _is_pg_child(entry, pg_dir):
                    continue
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                pg += (int(fields[11]) + int(fields[12])) / tick
            except OSError:
                continue
    return (children.ru_utime + children.ru_stime, me.ru_utime + me.ru_stime, pg)


def _is_pg_child(entry: Path, pg_dir: Path) -> bool:
    """Backends are named "postgres: ..." and descend from the postmaster."""
    try:
        cmdline = (entry / "cmdline").read_bytes()
        if not cmdline.startswith(b"postgres:"):
            return False
        ppid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]
        return str(pg_dir) in Path(f"/proc/{ppid}/cmdline").read_bytes().decode(
            errors="replace")
    except OSError:
        return False


PAGE = os.sysconf("SC_PAGE_SIZE")
MIB = 1 << 20


def _rss(pid: int | str) -> int:
    """Resident bytes of one process (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as statm:
            return int(statm.read().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


def _peak_rss(pid: int | str) -> int:
    """The largest resident size of one process since it exec'd (VmHWM; a child's
    ``ru_maxrss`` would include the parent's pages it held between fork and exec)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as status:
            for line in status:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    return 0


def _descendants(pid: int) -> list[str]:
    """Every live descendant of ``pid`` (children of any of its threads), PostgreSQL's
    excepted (a private server is started by this process, a shared one is not)."""
    found: list[str] = []
    stack = [str(pid)]
    while stack:
        parent = stack.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{parent}/task/{task}/children") as listing:
                    children = listing.read().split()
            except OSError:
                continue
            for child in children:
                try:
                    with open(f"/proc/{child}/comm") as comm:
                        if comm.read().startswith(("postgres", "pg_ctl")):
                            continue
                except OSError:
                    continue
                found.append(child)
                stack.append(child)
    return found


class PeakMemory:
    """Samples (this process's growth since start) + (its descendants' peak RSS) every
    ``interval`` seconds in a thread; ``peak`` is the largest sum seen. A child's
    peak is exact (VmHWM); this process's is sampled. Not more often: a sample is
    a dozen /proc reads, and this process's CPU time is part of (b)'s."""

    def __init__(self, *, count_self: bool, interval: float = 0.05) -> None:
        self.count_self = count_self
        self.interval = interval
        self.base = _rss(os.getpid())
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="peak-memory")

    def _sample(self) -> None:
        me = os.getpid()
        total = sum(_peak_rss(child) for child in _descendants(me))
        if self.count_self:
            total += max(0, _rss(me) - self.base)
        self.peak = max(self.peak, total)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def nix_alone(repo: Path, count: int, env: dict[str, str]) -> tuple[float, float, int]:
    """Wall and CPU seconds and peak RSS (bytes) of plain nix-instantiate over fresh
    derivations."""
    commit_flake(repo, count)
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    with PeakMemory(count_self=False) as memory:
        child = subprocess.Popen(
            ["nix-instantiate", "-E",
             f'(builtins.getFlake "git+file://{repo}?ref=main").hydraJobs'],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        child.wait()
    wall = time.monotonic() - started
    if child.returncode != 0:
        raise subprocess.CalledProcessError(child.returncode, child.args)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (wall, (after.ru_utime + after.ru_stime) - (cpu.ru_utime + cpu.ru_stime),
            memory.peak)


def import_alone(factory: sessionmaker[Session], jobset_id: int, count: int) -> float:
    """Seconds to import ``count`` jobs whose records and .drv facts are already known."""
    salt = secrets.token_hex(16)
    jobs = [Job(name=f"job{i}", attr_path=[f"job{i}"], nix_name=f"bench-{i}",
                system=current_system(), drv_path=f"/nix/store/{salt}-bench-{i}.drv",
                outputs={"out": f"/nix/store/{salt}-bench-{i}"},
                facts=DrvFacts(False, [], False, [])) for i in range(count)]
    with factory() as session:
        evaluation = Evaluation(jobset_id=jobset_id, trigger_kind=TriggerKind.manual,
                                status=EvaluationStatus.running)
        session.add(evaluation)
        session.commit()
        jobset = session.get_one(Jobset, jobset_id)
        started = time.monotonic()
        importer = BuildImporter(session, evaluation, jobset, reuse=True, max_retries=3)
        for start in range(0, count, 2000):
            importer.add(jobs[start:start + 2000])
        importer.finish([])
        evaluation.status = EvaluationStatus.completed
        session.commit()
        return time.monotonic() - started


def main(argv: list[str]) -> int:
    repeat = 1
    if argv and argv[0].startswith("--repeat="):
        repeat = int(argv.pop(0).split("=", 1)[1])
    sizes = [int(a) for a in argv] or [1000, 10000, 50000]
    scratch = Path(tempfile.mkdtemp(prefix="circus-bench-eval-"))
    server: PrivatePostgres | None = None
    server_url = os.environ.get("CIRCUS_BENCH_DATABASE_URL")
    if not server_url:
        server = PrivatePostgres(Path(f"/tmp/circus-bench-pg-{os.getpid()}"), durable=False)
        server.start()
        server_url = server.url("postgres")
    name = f"circus_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(normalise_url(server_url), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(normalise_url(server_url)).set(database=name).render_as_string(
        hide_password=False)
    try:
        upgrade(url)
        settings = load_settings(files=[], environ={}, overrides={
            "database": {"url": url}, "broker": {"url": "memory://localhost/"},
            "nix": {"substituters": []},
            "evaluator": {"work_dir": str(scratch / "work"), "nix_timeout": 3600}})
        create_celery_app(settings)
        engine = create_engine(normalise_url(url))
        factory = sessionmaker(bind=engine, expire_on_commit=False)
        env = settings.nix_environ()
        repo = scratch / "repo"
        repo.mkdir()
        git(repo, "init", "-q", "-b", "main")
        pg_dir = server.directory if server is not None else None
        print("wall seconds: (a) nix-instantiate alone, (b) trigger -> builds committed "
              "(best of --repeat); cpu seconds include Nix, Python and PostgreSQL")
        print("import/s: the import alone (records known, COPY batches, commit); "
              "N/(b-a): builds per second beyond Nix's own time")
        print("mem: peak RSS in MiB (a) nix-instantiate, (b) Nix processes + the "
              "evaluator's growth (largest of --repeat); py base: the evaluator before")
        print(f"{'N':>7} {'(a) nix':>8} {'(b) circus':>10} {'after nix':>9} {'b/a':>5} "
              f"{'import/s':>9} {'N/(b-a)':>9} {'cpu a':>7} {'cpu b':>7} {'N/cpu(b-a)':>11} "
              f"{'mem a':>6} {'mem b':>6} {'mem b/a':>7} {'py base':>7}")
        for count in sizes:
            best_a = best_b = float("inf")
            cpu_a = cpu_b = 0.0
            tail = 0.0
            mem_a = mem_b = base = 0
            for _ in range(repeat):
                a, a_cpu, a_mem = nix_alone(repo, count, env)
                mem_a = max(mem_a, a_mem)
                if a < best_a:
                    best_a, cpu_a = a, a_cpu
                commit_flake(repo, count)
                with factory() as session, session.begin():
                    project = Project(name=f"bench{count}-{secrets.token_hex(3)}",
                                      repository_url=f"file://{repo}")
                    jobset = Jobset(project=project, name="main", branch="main")
                    session.add_all([project, jobset])
                    session.flush()
                    jobset_id = jobset.id
                before = cpu_seconds(pg_dir)
                started = time.monotonic()
                with PeakMemory(count_self=True) as memory:
                    with factory() as session, session.begin():
                        evaluation, _ = service.trigger(session, jobset_id,
                                                        TriggerKind.manual)
                    outcome = execution.execute(factory, settings, evaluation.id)
                b = time.monotonic() - started
                after = cpu_seconds(pg_dir)
                mem_b = max(mem_b, memory.peak)
                base = memory.base
                if outcome.stats is None or outcome.stats.new != count:
                    print(f"evaluation did not produce {count} builds: {outcome}")
                    return 1
                if b < best_b:
                    best_b, tail = b, outcome.import_time
                    cpu_b = sum(after) - sum(before)
                    if os.environ.get("BENCH_VERBOSE"):
                        print("  cpu children/self/pg:",
                              [round(x - y, 2) for x, y in zip(after, before, strict=True)],
                              f"fetch {outcome.fetch_time:.2f}s program "
                              f"{outcome.program_time:.2f}s")
            imported = min(import_alone(factory, jobset_id, count) for _ in range(repeat))
            beyond = count / (best_b - best_a) if best_b > best_a else float("inf")
            extra_cpu = cpu_b - cpu_a
            per_cpu = count / extra_cpu if extra_cpu > 0 else float("inf")
            print(f"{count:>7} {best_a:>7.2f}s {best_b:>9.2f}s {tail:>8.2f}s "
                  f"{best_b / best_a:>5.2f} {count / imported:>9,.0f} {beyond:>9,.0f} "
                  f"{cpu_a:>6.1f}s {cpu_b:>6.1f}s {per_cpu:>11,.0f} "
                  f"{mem_a / MIB:>6.0f} {mem_b / MIB:>6.0f} {mem_b / mem_a:>7.2f} "
                  f"{base / MIB:>7.0f}", flush=True)
        engine.dispose()
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
        if server is not None:
            server.remove()
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
