"""Profile of the evaluator's own Python per job: a recorded evaluation, replayed.

It evaluates a flake of N trivial derivations once with the built-in walker
(``nix-instantiate`` run through a stand-in that records what Nix printed), then
evaluates the same flake in a fresh jobset with a stand-in that replays the
recording: the same lines, the same .drv files, no Nix CPU. The replay runs
under cProfile in every thread (the stderr reader, the job sink and importer,
the caller) and the merged profile is printed, with the evaluator's and
PostgreSQL's CPU seconds.

Usage: python bench/eval_profile.py [N] [--sort=tottime] [--top=40] [--replays=R]
  (default 20000 jobs; ``--replays=R`` replays R more times without the profiler and
  prints their CPU seconds: cProfile's own cost is most of a profiled replay's)
"""

from __future__ import annotations

import cProfile
import os
import pstats
import secrets
import shutil
import sys
import tempfile
import textwrap
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import sessionmaker

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "bench"))

from eval_import import commit_flake, cpu_seconds, git  # noqa: E402

from circus.cli.migrate import upgrade  # noqa: E402
from circus.common.celery import create_celery_app  # noqa: E402
from circus.common.config import load_settings  # noqa: E402
from circus.common.db import normalise_url  # noqa: E402
from circus.common.enums import TriggerKind  # noqa: E402
from circus.common.localservices import PrivatePostgres  # noqa: E402
from circus.common.models import Jobset, Project  # noqa: E402
from circus.evaluator import execution, service  # noqa: E402

#: the stand-in: records (mode "record") or replays nix-instantiate's output, the
#: walker's marker of the recording swapped for the one in the expression file (the
#: evaluation's environment is scrubbed: the mode is written into the script)
STAND_IN = """\
#!{python}
import re, subprocess, sys
expr = open(sys.argv[-1]).read()
marker = re.search(r'marker = "(@circus-[0-9a-f]+@)"', expr).group(1)
record = replay = {recording!r}
if {mode!r} == "record":
    done = subprocess.run(["{nix}", *sys.argv[1:]], capture_output=True, text=True)
    with open(record, "w") as out:
        out.write(marker + "\\n" + done.stdout + "\\0" + done.stderr)
    sys.stdout.write(done.stdout)
    sys.stderr.write(done.stderr)
    sys.exit(done.returncode)
recorded = open(replay).read()
old, rest = recorded.split("\\n", 1)
stdout, stderr = rest.split("\\0", 1)
sys.stderr.write(stderr.replace(old, marker))
sys.stderr.flush()
sys.stdout.write(stdout)
"""


def profile_threads() -> tuple[list[cProfile.Profile], Callable[[threading.Thread], None]]:
    """Every thread started from now on runs under its own profiler (collected)."""
    profiles: list[cProfile.Profile] = []
    original = threading.Thread.run

    def run(self: threading.Thread) -> None:
        profiler = cProfile.Profile()
        profiler.enable()
        try:
            original(self)
        finally:
            profiler.disable()
            profiles.append(profiler)

    threading.Thread.run = run  # type: ignore[method-assign]
    return profiles, original


def report(label: str, count: int, outcome: execution.Outcome,
           before: tuple[float, float, float], after: tuple[float, float, float]) -> None:
    children, me, pg = (a - b for a, b in zip(after, before, strict=True))
    print(f"{count} jobs replayed ({label}): evaluator {me:.2f} CPU-s "
          f"({me / count * 1e6:.0f} us/job), PostgreSQL {pg:.2f}, stand-in {children:.2f}; "
          f"program {outcome.program_time:.2f}s, after it {outcome.import_time:.2f}s",
          flush=True)


def main(argv: list[str]) -> int:
    sort = next((a.split("=", 1)[1] for a in argv if a.startswith("--sort=")), "tottime")
    top = int(next((a.split("=", 1)[1] for a in argv if a.startswith("--top=")), "40"))
    replays = int(next((a.split("=", 1)[1] for a in argv if a.startswith("--replays=")), "0"))
    counts = [int(a) for a in argv if not a.startswith("--")]
    count = counts[0] if counts else 20000
    scratch = Path(tempfile.mkdtemp(prefix="circus-bench-profile-"))
    server = PrivatePostgres(Path(f"/tmp/circus-bench-pg-{os.getpid()}"), durable=False)
    server.start()
    name = f"circus_bench_{uuid.uuid4().hex[:8]}"
    try:
        admin = create_engine(normalise_url(server.url("postgres")),
                              isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        admin.dispose()
        url = make_url(normalise_url(server.url("postgres"))).set(
            database=name).render_as_string(hide_password=False)
        upgrade(url)
        bin_dir = scratch / "bin"
        bin_dir.mkdir()
        stand_in = bin_dir / "nix-instantiate"
        recording = scratch / "recording"
        nix = shutil.which("nix-instantiate")
        settings = load_settings(files=[], environ={}, overrides={
            "database": {"url": url}, "broker": {"url": "memory://localhost/"},
            "nix": {"substituters": []},
            "evaluator": {"work_dir": str(scratch / "work"), "nix_timeout": 3600}})
        create_celery_app(settings)
        factory = sessionmaker(bind=create_engine(normalise_url(url)),
                               expire_on_commit=False)
        repo = scratch / "repo"
        repo.mkdir()
        git(repo, "init", "-q", "-b", "main")
        commit_flake(repo, count)
        os.environ["PATH"] = f"{bin_dir}:{os.environ['PATH']}"

        def evaluate(mode: str) -> execution.Outcome:
            with factory() as session, session.begin():
                project = Project(name=f"profile-{secrets.token_hex(3)}",
                                  repository_url=f"file://{repo}")
                jobset = Jobset(project=project, name="main", branch="main")
                session.add_all([project, jobset])
                session.flush()
                evaluation, _ = service.trigger(session, jobset.id, TriggerKind.manual)
            stand_in.write_text(STAND_IN.format(python=sys.executable, nix=nix, mode=mode,
                                                recording=str(recording)))
            stand_in.chmod(0o755)
            return execution.execute(factory, settings, evaluation.id)

        recorded = evaluate("record")
        if recorded.stats is None or recorded.stats.new != count:
            print(f"the recorded evaluation did not produce {count} builds: {recorded}")
            return 1
        profiles, original_run = profile_threads()
        before = cpu_seconds(server.directory)
        main_profile = cProfile.Profile()
        main_profile.enable()
        replayed = evaluate("replay")
        main_profile.disable()
        after = cpu_seconds(server.directory)
        threading.Thread.run = original_run  # type: ignore[method-assign,assignment]
        if replayed.stats is None or replayed.stats.new != count:
            print(f"the replayed evaluation did not produce {count} builds: {replayed}")
            return 1
        report("profiled", count, replayed, before, after)
        for _ in range(replays):
            before = cpu_seconds(server.directory)
            replayed = evaluate("replay")
            report("unprofiled", count, replayed, before, cpu_seconds(server.directory))
        stats = pstats.Stats(main_profile)
        for profile in profiles:
            stats.add(profile)
        stats.sort_stats(sort).print_stats(top)
        print(textwrap.dedent("""\
            (threads: the stand-in's stderr reader runs the walker's line handler, the
            job-sink thread reads .drv files and runs the import)"""))
    finally:
        server.remove()
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
