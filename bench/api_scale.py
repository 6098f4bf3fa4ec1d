"""API and dashboard latency at a million builds.

Generates, inside PostgreSQL (``INSERT ... SELECT generate_series``), 200 jobsets in
20 projects with 50 evaluations each (10,000), 2,000 jobs per jobset: the first
evaluation of a jobset builds every job, each later one rebuilds ~61 of them and
links the rest (Hydra's evaluation members: 20M ``evaluation_builds`` rows), so
~1,000,000 builds, each with an output and a step. Then starts circus-server
(gunicorn, 2 workers, as in production) and has 4 client threads (keep-alive HTTP,
one shared API key) request each route in turn, rotating over evaluations and
jobsets, and prints p50/p99 per route against the 50 ms target, with the cheapest
route (one build by id) measured in the same run as the baseline.

    .venv/bin/python bench/api_scale.py [--scale 0.1] [--data DIR] [--requests 80]

``--scale`` shrinks the jobs and builds per jobset (for development). ``--data DIR``
keeps the database cluster in DIR and reuses it on the next run (the data is only
generated once, so two versions of the code are measured on the same rows; the
migrations still run, so a new one is applied to the existing rows).
"""

from __future__ import annotations

import argparse
import http.client
import os
import shutil
import statistics
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import create_engine, text  # noqa: E402
from sqlalchemy.engine import Connection  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

from circus.auth import service as auth  # noqa: E402
from circus.auth.actor import Actor  # noqa: E402
from circus.cli.migrate import upgrade  # noqa: E402
from circus.common import rollups  # noqa: E402
from circus.common.db import normalise_url  # noqa: E402
from circus.common.enums import Role  # noqa: E402
from circus.common.localservices import PrivatePostgres  # noqa: E402
from tests.helpers.daemons import Daemon, circus_command  # noqa: E402
from tests.helpers.net import free_port, wait_for_http  # noqa: E402

PROJECTS = 20
JOBSETS_PER_PROJECT = 10
EVALUATIONS_PER_JOBSET = 50
JOBS_PER_JOBSET = 2000
#: new builds per jobset after its first evaluation (spread over the later evaluations)
REBUILDS_PER_JOBSET = 3000
TARGET_MS = 50.0
CLIENTS = 4


@contextmanager
def indexes_dropped(conn: Connection, table: str, constraints: bool = False) -> Iterator[None]:
    """Bulk insert into ``table`` without its secondary indexes (and its primary key and
    unique constraints, when nothing references them), rebuilt afterwards: building an
    index once over sorted rows is many times cheaper than millions of index inserts."""
    kept = [] if not constraints else list(conn.execute(text(
        "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
        "WHERE conrelid = CAST(:t AS regclass) AND contype IN ('p', 'u')"), {"t": table}))
    owned = [name for name, _ in kept] + list(conn.execute(text(
        "SELECT conname FROM pg_constraint WHERE conrelid = CAST(:t AS regclass) "
        "AND contype IN ('p', 'u')"), {"t": table}).scalars())
    indexes = [(name, sql) for name, sql in conn.execute(text(
        "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = :t"), {"t": table})
        if name not in owned]
    for name, _ in kept:
        conn.execute(text(f'ALTER TABLE {table} DROP CONSTRAINT "{name}"'))
    for name, _ in indexes:
        conn.execute(text(f'DROP INDEX "{name}"'))
    yield
    for name, definition in kept:
        conn.execute(text(f'ALTER TABLE {table} ADD CONSTRAINT "{name}" {definition}'))
    for _, sql in indexes:
        conn.execute(text(sql))


def generate(conn: Connection, scale: float) -> dict[str, int]:
    """Fill an empty, migrated database; returns the shape for the URLs."""
    jobsets = PROJECTS * JOBSETS_PER_PROJECT
    jobs = max(10, int(JOBS_PER_JOBSET * scale))
    per_round = max(1, int(REBUILDS_PER_JOBSET * scale) // (EVALUATIONS_PER_JOBSET - 1))
    builds_per_jobset = jobs + per_round * (EVALUATIONS_PER_JOBSET - 1)
    shape = {"jobsets": jobsets, "jobs": jobs, "per_round": per_round,
             "builds_per_jobset": builds_per_jobset, "rounds": EVALUATIONS_PER_JOBSET}
    # bulk load: the rows are consistent by construction, foreign-key triggers off
    conn.execute(text("SET session_replication_role = replica"))
    conn.execute(text("SET maintenance_work_mem = '256MB'"))
    conn.execute(text("""
        INSERT INTO projects (id, name, description, enabled, hidden)
        SELECT p, 'project' || p, 'generated project ' || p, true, false
        FROM generate_series(1, :projects) p"""), {"projects": PROJECTS})
    conn.execute(text("""
        INSERT INTO jobsets (id, project_id, name)
        SELECT j, (j - 1) / :per + 1, 'jobset' || j FROM generate_series(1, :n) j"""),
        {"per": JOBSETS_PER_PROJECT, "n": jobsets})
    # evaluation id = round * jobsets + jobset: jobsets take turns, 30 seconds apart
    conn.execute(text("""
        INSERT INTO evaluations (id, jobset_id, trigger_kind, status, inputs, commit_hash,
                                 created_at, started_at, finished_at, builds_new,
                                 builds_reused)
        SELECT e, (e - 1) % :jobsets + 1, 'source_change', 'completed', '{}',
               md5(e::text) || substr(md5(e::text), 1, 8),
               now() - (:total - e) * interval '30 seconds',
               now() - (:total - e) * interval '30 seconds',
               now() - (:total - e) * interval '30 seconds' + interval '20 seconds',
               CASE WHEN e <= :jobsets THEN :jobs ELSE :per_round END,
               CASE WHEN e <= :jobsets THEN 0 ELSE :jobs - :per_round END
        FROM generate_series(1, :total) e"""),
        {"jobsets": jobsets, "total": jobsets * EVALUATIONS_PER_JOBSET, "jobs": jobs,
         "per_round": per_round})
    with indexes_dropped(conn, "builds"):
        # build (jobset js, local index l): l < jobs is job l of round 0; later ones are
        # rebuilds, the m-th (m = l - jobs) of job m % jobs in round m / per_round + 1
        conn.execute(text("""
            INSERT INTO builds (id, evaluation_id, jobset_id, project_id, job_name, drv_path,
                                system, status, created_at, stepped_at, started_at,
                                completed_at, nix_name, machine)
            SELECT id, round * :jobsets + js, js, (js - 1) / :per_project + 1,
                   'pkgs.package' || lpad(job::text, 5, '0'),
                   '/nix/store/' || md5('drv' || id) || '-package' || job || '.drv',
                   CASE WHEN job % 10 = 9 THEN 'aarch64-linux' ELSE 'x86_64-linux' END,
                   CASE WHEN round = :last AND id % 5 = 0 THEN 0
                        WHEN round = :last AND id % 5 = 1 THEN 1
                        WHEN id % 13 = 0 THEN 3 WHEN id % 101 = 0 THEN 4 ELSE 2 END,
                   at, at, at + interval '1 minute',
                   CASE WHEN round = :last AND id % 5 IN (0, 1) THEN NULL
                        ELSE at + interval '1 minute' + (id % 300) * interval '1 second' END,
                   'package' || job, 'localhost'
            FROM (SELECT (js - 1) * :bpj + l + 1 AS id, js, l,
                         CASE WHEN l < :jobs THEN 0 ELSE (l - :jobs) / :per_round + 1 END AS round,
                         CASE WHEN l < :jobs THEN l ELSE (l - :jobs) % :jobs END AS job,
                         now() - (:total - ((CASE WHEN l < :jobs THEN 0
                                                 ELSE (l - :jobs) / :per_round + 1 END)
                                            * :jobsets + js)) * interval '30 seconds' AS at
                  FROM generate_series(1, :jobsets) js, generate_series(0, :bpj - 1) l) b"""),
            {"jobsets": jobsets, "per_project": JOBSETS_PER_PROJECT, "bpj": builds_per_jobset,
             "jobs": jobs, "per_round": per_round, "last": EVALUATIONS_PER_JOBSET - 1,
             "total": jobsets * EVALUATIONS_PER_JOBSET})
    # what the builds' insert triggers (off here) write: the distinct job names, the rollups
    conn.execute(text("INSERT INTO job_names (name) SELECT DISTINCT job_name FROM builds"))
    rollups.rebuild(conn)
    with indexes_dropped(conn, "evaluation_builds", constraints=True):
        # membership: evaluation (js, r) holds, per job, its newest build of a round <= r
        conn.execute(text("""
            INSERT INTO evaluation_builds (evaluation_id, build_id, is_new, created_at)
            SELECT r * :jobsets + js, (js - 1) * :bpj + l + 1,
                   CASE WHEN l < :jobs THEN r = 0 ELSE (l - :jobs) / :per_round + 1 = r END,
                   now()
            FROM (SELECT js, r, CASE WHEN job < r * :per_round
                                     THEN :jobs + job + :jobs * ((r * :per_round - 1 - job) / :jobs)
                                     ELSE job END AS l
                  FROM generate_series(1, :jobsets) js, generate_series(0, :rounds - 1) r,
                       generate_series(0, :jobs - 1) job) m"""),
            {"jobsets": jobsets, "bpj": builds_per_jobset, "jobs": jobs, "per_round": per_round,
             "rounds": EVALUATIONS_PER_JOBSET})
    conn.execute(text("""
        INSERT INTO build_outputs (build_id, name, path)
        SELECT id, 'out', '/nix/store/' || md5('out' || id) || '-' || nix_name FROM builds"""))
    conn.execute(text("""
        INSERT INTO steps (id, drv_path, system, required_features, queue_class, state,
                           status, created_at, started_at, finished_at, machine)
        SELECT id, drv_path, system, '{}', system,
               CASE status WHEN 0 THEN 'pending' WHEN 1 THEN 'running' ELSE 'done' END,
               CASE WHEN status IN (0, 1) THEN NULL ELSE status END,
               created_at, started_at, completed_at, machine FROM builds"""))
    conn.execute(text("""
        INSERT INTO build_steps (build_id, step_nr, step_id, drv_path, is_toplevel, created_at)
        SELECT id, 1, id, drv_path, true, created_at FROM builds"""))
    for table in ("projects", "jobsets", "evaluations", "builds", "steps", "build_steps"):
        conn.execute(text(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                          f"(SELECT max(id) FROM {table}))"))
    conn.execute(text("SET session_replication_role = origin"))
    return shape


def ensure_data(url: str, scale: float) -> None:
    engine = create_engine(normalise_url(url), isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        if conn.execute(text("SELECT count(*) FROM projects")).scalar_one():
            print("reusing the generated data")
            engine.dispose()
            return
    start = time.monotonic()
    with engine.begin() as conn:
        shape = generate(conn, scale)
    generated = time.monotonic() - start
    with engine.connect() as conn:
        conn.execute(text("VACUUM ANALYZE"))
        counts = {t: conn.execute(text(f"SELECT count(*) FROM {t}")).scalar_one()
                  for t in ("evaluations", "builds", "evaluation_builds", "build_outputs",
                            "steps")}
    print(f"generated in {generated:.0f} s (+ {time.monotonic() - start - generated:.0f} s "
          f"VACUUM ANALYZE): {counts}; {shape}", flush=True)
    engine.dispose()


def routes(url: str) -> list[tuple[str, list[str]]]:
    """(name, paths rotated over) of every route measured; the first is the baseline."""
    engine = create_engine(normalise_url(url))
    with engine.connect() as conn:
        jobsets = conn.execute(text("SELECT count(*) FROM jobsets")).scalar_one()
        last_eval = conn.execute(text("SELECT max(id) FROM evaluations")).scalar_one()
        builds = conn.execute(text("SELECT max(id) FROM builds")).scalar_one()
        outputs = [p for (p,) in conn.execute(text(
            "SELECT path FROM build_outputs WHERE build_id % 9973 = 0 LIMIT 8"))]
        jobs = conn.execute(text("SELECT count(DISTINCT job_name) FROM builds "
                                 "WHERE jobset_id = 1")).scalar_one()
    engine.dispose()
    # recent evaluations of 8 different jobsets, and jobsets spread over the projects
    evals = [last_eval - 7 * k for k in range(8)]
    sets = [1 + (37 * k) % jobsets for k in range(8)]
    names = [(f"project{(j - 1) // JOBSETS_PER_PROJECT + 1}", f"jobset{j}") for j in sets]
    job_queries = [f"package{(131 * k) % jobs:05d}" for k in range(8)]
    return [
        ("baseline: build by id", [f"/api/v1/builds/{builds - 1000 * k}" for k in range(8)]),
        ("builds?evaluation_id", [f"/api/v1/builds?evaluation_id={e}&limit=50" for e in evals]),
        ("builds?jobset_id", [f"/api/v1/builds?jobset_id={j}&limit=50" for j in sets]),
        ("builds?status=failed", [f"/api/v1/builds?status=failed&limit=50&offset={k * 50}"
                                  for k in range(8)]),
        ("builds?offset=deep", [f"/api/v1/builds?limit=50&offset={builds // 2 + k * 50}"
                                for k in range(8)]),
        ("builds?cursor=deep", [f"/api/v1/builds?limit=50&cursor={builds // 2 - k * 50}"
                                for k in range(8)]),
        ("evaluations", ["/api/v1/evaluations?limit=20"]),
        ("evaluations?jobset_id", [f"/api/v1/evaluations?jobset_id={j}&limit=20"
                                   for j in sets]),
        ("evaluations/<id>", [f"/api/v1/evaluations/{e}" for e in evals]),
        ("evaluations/<id>/compare", [f"/api/v1/evaluations/{e}/compare?to={e - jobsets}"
                                      for e in evals]),
        ("builds/stats", ["/api/v1/builds/stats"]),
        ("builds/stats?jobset_id", [f"/api/v1/builds/stats?jobset_id={j}" for j in sets]),
        ("timeseries/builds", ["/api/v1/metrics/timeseries/builds?days=30&bucket=day"]),
        ("timeseries/duration", ["/api/v1/metrics/timeseries/duration?days=14&bucket=hour"]),
        ("search job name", [f"/api/v1/search?q={q}" for q in job_queries]),
        ("search store path", [f"/api/v1/search?q={p[11:23]}" for p in outputs]),
        ("dashboard /", ["/"]),
        ("dashboard /project", [f"/project/{p}" for p, _ in names]),
        ("dashboard /jobset (matrix)", [f"/jobset/{p}/{j}" for p, j in names]),
        ("dashboard /jobset?job=", [f"/jobset/{p}/{j}?job=package01" for p, j in names]),
        ("dashboard /eval/<id>", [f"/eval/{e}" for e in evals]),
    ]


def measure(port: int, headers: dict[str, str], paths: list[str], requests: int,
            seconds: float) -> tuple[list[float], int]:
    """Latencies (ms) of ``requests`` GETs by CLIENTS threads (or fewer if ``seconds``
    run out), and the number of non-200 answers."""
    times: list[float] = []
    errors = [0]
    lock = threading.Lock()
    deadline = time.monotonic() + seconds
    counter = iter(range(requests))

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        try:
            while time.monotonic() < deadline:
                with lock:
                    n = next(counter, None)
                if n is None:
                    return
                start = time.perf_counter()
                conn.request("GET", paths[n % len(paths)], headers=headers)
                response = conn.getresponse()
                response.read()
                elapsed = (time.perf_counter() - start) * 1000
                with lock:
                    times.append(elapsed)
                    if response.status != 200:
                        errors[0] += 1
        finally:
            conn.close()

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return times, errors[0]


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--data", type=Path, help="keep (and reuse) the cluster here")
    parser.add_argument("--requests", type=int, default=80, help="per route")
    parser.add_argument("--seconds", type=float, default=20.0, help="at most, per route")
    parser.add_argument("--only", default="", help="comma-separated route name substrings")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="circus-bench-api-"))
    directory = args.data or Path(f"/tmp/circus-bench-pg-{os.getpid()}")
    postgres = PrivatePostgres(directory, durable=False)
    daemon = None
    try:
        postgres.start()
        admin = create_engine(normalise_url(postgres.url("postgres")),
                              isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            if not conn.execute(text("SELECT 1 FROM pg_database WHERE datname = 'bench'")
                                ).first():
                conn.execute(text('CREATE DATABASE "bench"'))
        admin.dispose()
        url = postgres.url("bench")
        start = time.monotonic()
        upgrade(url)
        print(f"migrations: {time.monotonic() - start:.1f} s", flush=True)
        ensure_data(url, args.scale)

        engine = create_engine(normalise_url(url))
        with Session(engine) as session:
            _, secret = auth.create_api_key(session, Actor.system("bench"),
                                            name=f"bench-{time.time_ns()}", role=Role.admin)
            session.commit()
        engine.dispose()
        headers = {"Authorization": f"Bearer {secret}"}

        port = free_port()
        config = work / "circus.toml"
        config.write_text(textwrap.dedent(f"""
            [database]
            url = "{url}"
            [broker]
            url = "redis://127.0.0.1:1/0"
            [server]
            workers = 2
            secret_key = "{'x' * 40}"
            rate_limit_enabled = false
            [logs]
            log_dir = "{work / 'logs'}"
            [tracing]
            level = "warning"
        """))
        daemon = Daemon("circus-server", [circus_command("circus-server"), "--port", str(port)],
                        work, env={**os.environ, "CIRCUS_CONFIG_FILE": str(config)}).start()
        wait_for_http(f"http://127.0.0.1:{port}/nix-cache/nix-cache-info", timeout=60)

        wanted: Callable[[str], bool] = (
            (lambda name: True) if not args.only else
            (lambda name: any(part in name for part in args.only.split(","))))
        print(f"\n{CLIENTS} clients, up to {args.requests} requests or {args.seconds:.0f} s "
              f"per route (server: 2 gunicorn workers)")
        print(f"{'route':<28} {'n':>4} {'p50 ms':>8} {'p99 ms':>8} {'x base':>7}  "
              f"target {TARGET_MS:.0f} ms")
        base = 0.0
        misses = 0
        for index, (name, paths) in enumerate(routes(url)):
            if index and not wanted(name):
                continue
            # a warm-up round over the paths, two requests per client at least: every
            # worker has imported, connected and compiled the page's templates (a route
            # of one path warmed one worker, and the other compiled them in the measure)
            measure(port, headers, paths, max(len(paths), 2 * CLIENTS), args.seconds)
            times, errors = measure(port, headers, paths, args.requests, args.seconds)
            p50, p99 = statistics.median(times), percentile(times, 0.99)
            base = base or p50
            ok = p99 < TARGET_MS
            misses += not ok
            note = f"  ({errors} non-200)" if errors else ""
            print(f"{name:<28} {len(times):>4} {p50:>8.1f} {p99:>8.1f} {p50 / base:>7.1f}  "
                  f"{'ok' if ok else 'miss'}{note}", flush=True)
        print(f"\n{misses} route(s) miss p99 < {TARGET_MS:.0f} ms")
        return 0
    except BaseException:
        if daemon is not None:
            errors = [line for line in daemon.log().splitlines()
                      if "Error" in line or "Traceback" in line]
            print(*errors[-15:], sep="\n", file=sys.stderr)
        raise
    finally:
        if daemon is not None:
            daemon.stop()
        if args.data is None:
            postgres.remove()
        else:
            postgres.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
