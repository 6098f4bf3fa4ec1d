"""Dashboard page latency on big jobsets: N jobs x 10 evaluations.

For each N it fills a jobset with 10 evaluations of N jobs (the first creates N
builds, each later one links them and adds N/10 new builds, like a busy jobset),
then times the pages people open most, through the real Flask app (in process,
no network), with the API's list of the same evaluation's builds as the baseline
measured in the same run:

  baseline  GET /api/v1/builds?evaluation_id=<last>&limit=100
  jobset    GET /jobset/<p>/<j>          (job matrix page 1: 50 jobs x 10 evaluations)
  filter    GET /jobset/<p>/<j>?job=7    (the matrix filtered by name)
  eval      GET /eval/<last>?status=all  (first 100 builds)
  eval-last GET /eval/<last>?status=all&page=<last>
  build     GET /build/<id>
  home      GET /

Prints the median of R runs in milliseconds, the ratio to the baseline and the
number of SQL statements per page.

Usage: python bench/dashboard_pages.py [--repeat=R] [N ...]   (default: 1000 10000 50000)
Uses $CIRCUS_BENCH_DATABASE_URL (a server URL; a scratch database is created on
it) or a private PostgreSQL in a temporary directory.
"""

from __future__ import annotations

import os
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from circus.auth import service as auth  # noqa: E402
from circus.auth.actor import Actor  # noqa: E402
from circus.cli.migrate import upgrade  # noqa: E402
from circus.common.config import load_settings  # noqa: E402
from circus.common.db import normalise_url  # noqa: E402
from circus.common.enums import Role  # noqa: E402
from circus.common.localservices import PrivatePostgres  # noqa: E402
from circus.server.app import create_app  # noqa: E402

EVALUATIONS = 10


@contextmanager
def database() -> Iterator[str]:
    configured = os.environ.get("CIRCUS_BENCH_DATABASE_URL")
    if configured:
        name = f"bench_dashboard_{secrets.token_hex(4)}"
        admin = create_engine(normalise_url(configured), isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            yield make_url(normalise_url(configured)).set(database=name).render_as_string(
                hide_password=False)
        finally:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            admin.dispose()
        return
    directory = Path(tempfile.mkdtemp(prefix="circus-bench-pg-", dir="/tmp"))
    directory.chmod(0o755)
    server = PrivatePostgres(directory, durable=False)
    server.start()
    try:
        yield server.url("postgres")
    finally:
        server.remove()


def fill(engine: Engine, project: str, jobs: int) -> int:
    """A project with one jobset and 10 evaluations; returns the last evaluation's id."""
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE projects, evaluations, builds RESTART IDENTITY CASCADE"))
        pid = conn.execute(text("INSERT INTO projects (name) VALUES (:n) RETURNING id"),
                           {"n": project}).scalar_one()
        jid = conn.execute(text("INSERT INTO jobsets (project_id, name) VALUES (:p, 'main') "
                                "RETURNING id"), {"p": pid}).scalar_one()
        last = 0
        for round_ in range(EVALUATIONS):
            last = conn.execute(text(
                "INSERT INTO evaluations (jobset_id, trigger_kind, status, inputs) "
                "VALUES (:j, 'manual', 'completed', '{}') RETURNING id"), {"j": jid}).scalar_one()
            fresh = jobs if round_ == 0 else jobs // 10
            # new builds for some jobs (all of them the first time) ...
            conn.execute(text("""
                INSERT INTO builds (evaluation_id, jobset_id, project_id, job_name, drv_path,
                                    system, status, started_at, completed_at)
                SELECT :e, :j, :p, 'job' || i,
                       '/nix/store/' || md5(:e || '-' || i) || '-job' || i || '.drv',
                       'x86_64-linux', CASE WHEN i % 7 = 0 THEN 3 ELSE 2 END,
                       now() - interval '2 minutes', now() - interval '1 minute'
                FROM generate_series(0, :n - 1) AS i"""),
                {"e": last, "j": jid, "p": pid, "n": fresh})
            conn.execute(text("""
                INSERT INTO evaluation_builds (evaluation_id, build_id, is_new)
                SELECT :e, id, true FROM builds WHERE evaluation_id = :e"""), {"e": last})
            # ... and the rest linked from the newest build of each job
            conn.execute(text("""
                INSERT INTO evaluation_builds (evaluation_id, build_id, is_new)
                SELECT DISTINCT ON (job_name) :e, id, false FROM builds
                WHERE jobset_id = :j AND evaluation_id <> :e
                  AND job_name NOT IN (SELECT job_name FROM builds WHERE evaluation_id = :e)
                ORDER BY job_name, id DESC"""), {"e": last, "j": jid})
        conn.execute(text("ANALYZE"))
    return int(last)


def measure(client: object, path: str, headers: dict[str, str], repeat: int,
            engine: Engine) -> tuple[float, int]:
    statements: list[str] = []

    def count(*args: object) -> None:
        statements.append("x")

    times = []
    for run in range(repeat + 1):
        event.listen(engine, "before_cursor_execute", count)
        start = time.perf_counter()
        response = client.get(path, headers=headers)  # type: ignore[attr-defined]
        elapsed = time.perf_counter() - start
        event.remove(engine, "before_cursor_execute", count)
        assert response.status_code == 200, (path, response.status_code)
        if run == 0:
            per_page = len(statements)
        else:
            times.append(elapsed)
    return statistics.median(times) * 1000, per_page


def main(argv: list[str]) -> None:
    repeat = 5
    sizes: list[int] = []
    for arg in argv:
        if arg.startswith("--repeat="):
            repeat = int(arg.split("=", 1)[1])
        else:
            sizes.append(int(arg))
    sizes = sizes or [1000, 10000, 50000]
    with database() as server_url:
        url = server_url
        if not os.environ.get("CIRCUS_BENCH_DATABASE_URL"):
            admin = create_engine(normalise_url(server_url), isolation_level="AUTOCOMMIT")
            with admin.connect() as conn:
                conn.execute(text('CREATE DATABASE "bench"'))
            admin.dispose()
            url = make_url(normalise_url(server_url)).set(database="bench").render_as_string(
                hide_password=False)
        upgrade(url)
        settings = load_settings(files=[], environ={}, overrides={
            "database": {"url": url},
            "server": {"secret_key": "bench-" + "x" * 40, "rate_limit_enabled": False},
            "logs": {"log_dir": tempfile.mkdtemp(prefix="circus-bench-logs-")}})
        engine = create_engine(normalise_url(url), pool_size=2)
        app = create_app(settings, engine=engine)
        from sqlalchemy.orm import Session

        with Session(engine) as session:
            _, secret = auth.create_api_key(session, Actor.system("bench"), name="bench",
                                            role=Role.admin)
            session.commit()
        headers = {"Authorization": f"Bearer {secret}"}
        client = app.test_client()
        print(f"{'jobs':>7} {'page':<10} {'ms':>8} {'x base':>7} {'SQL':>4}")
        for jobs in sizes:
            last = fill(engine, "bench", jobs)
            with engine.connect() as conn:
                build = conn.execute(text("SELECT max(id) FROM builds")).scalar_one()
            pages = jobs // 100 + 1
            paths = [
                ("baseline", f"/api/v1/builds?evaluation_id={last}&limit=100"),
                ("jobset", "/jobset/bench/main"),
                ("filter", "/jobset/bench/main?job=7"),
                ("eval", f"/eval/{last}?status=all"),
                ("eval-last", f"/eval/{last}?status=all&page={pages}"),
                ("build", f"/build/{build}"),
                ("home", "/"),
            ]
            base = 0.0
            for name, path in paths:
                ms, statements = measure(client, path, headers, repeat, engine)
                base = base or ms
                print(f"{jobs:>7} {name:<10} {ms:>8.1f} {ms / base:>7.2f} {statements:>4}",
                      flush=True)
        engine.dispose()


if __name__ == "__main__":
    main(sys.argv[1:])
