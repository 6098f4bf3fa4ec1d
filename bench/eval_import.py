"""Evaluation import benchmark: N trivial derivations, trigger -> builds committed.

For each N it measures, on fresh (never instantiated) derivations:

  (a) Nix alone: ``nix-instantiate`` of the flake's ``hydraJobs`` (writes every .drv)
  (b) Circus: ``trigger()`` + the evaluation task, until every build is committed

and prints the import rate (builds per second of the import step itself), the
rate beyond Nix's own time (N / (b - a)) and the ratio b/a. Hydra's importer
manages about 80 builds/s.

Usage: python bench/eval_import.py [N ...]   (default: 1000 10000 50000)
Uses $CIRCUS_BENCH_DATABASE_URL (a server URL; a scratch database is created on
it) or a private PostgreSQL in a temporary directory.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import sessionmaker

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from circus.cli.migrate import upgrade  # noqa: E402
from circus.common.celery import create_celery_app  # noqa: E402
from circus.common.config import load_settings  # noqa: E402
from circus.common.db import normalise_url  # noqa: E402
from circus.common.enums import TriggerKind  # noqa: E402
from circus.common.localservices import PrivatePostgres  # noqa: E402
from circus.common.models import Jobset, Project  # noqa: E402
from circus.common.nix.environment import current_system  # noqa: E402
from circus.evaluator import execution, service  # noqa: E402

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


def nix_alone(repo: Path, count: int, env: dict[str, str]) -> float:
    commit_flake(repo, count)
    started = time.monotonic()
    subprocess.run(
        ["nix-instantiate", "-E",
         f'(builtins.getFlake "git+file://{repo}?ref=main").hydraJobs'],
        env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.monotonic() - started


def main(argv: list[str]) -> int:
    sizes = [int(a) for a in argv] or [1000, 10000, 50000]
    scratch = Path(tempfile.mkdtemp(prefix="circus-bench-eval-"))
    server: PrivatePostgres | None = None
    server_url = os.environ.get("CIRCUS_BENCH_DATABASE_URL")
    if not server_url:
        server = PrivatePostgres(Path(f"/tmp/circus-bench-pg-{os.getpid()}"))
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
        print(f"{'N':>7} {'nix alone':>10} {'circus':>9} {'program':>9} {'import':>8} "
              f"{'import/s':>10} {'beyond nix/s':>13} {'b/a':>6}")
        for count in sizes:
            a = nix_alone(repo, count, env)
            commit_flake(repo, count)
            with factory() as session, session.begin():
                project = Project(name=f"bench{count}-{secrets.token_hex(3)}",
                                  repository_url=f"file://{repo}")
                jobset = Jobset(project=project, name="main", branch="main")
                session.add_all([project, jobset])
                session.flush()
                jobset_id = jobset.id
            started = time.monotonic()
            with factory() as session, session.begin():
                evaluation, _ = service.trigger(session, jobset_id, TriggerKind.manual)
            outcome = execution.execute(factory, settings, evaluation.id)
            b = time.monotonic() - started
            if outcome.stats is None or outcome.stats.new != count:
                print(f"evaluation did not produce {count} builds: {outcome}")
                return 1
            beyond = count / (b - a) if b > a else float("inf")
            print(f"{count:>7} {a:>9.2f}s {b:>8.2f}s {outcome.program_time:>8.2f}s "
                  f"{outcome.import_time:>7.2f}s {count / outcome.import_time:>10,.0f} "
                  f"{beyond:>13,.0f} {b / a:>6.2f}", flush=True)
        engine.dispose()
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
        if server is not None:
            server.stop()
            subprocess.run(["rm", "-rf", str(server.directory)], check=False)
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
