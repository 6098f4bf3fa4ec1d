"""Where the time of each route of ``bench/api_scale.py`` goes: SQL or Python.

Reuses the cluster kept by ``api_scale.py --data DIR`` (run that first), serves each
route in this process through Flask's test client (one client, no HTTP, no gunicorn)
and prints per route the median request time, the SQL part of it (statement execution
as SQLAlchemy's cursor events see it, fetching included), the number of statements and
the slowest one. With ``--explain`` it also prints EXPLAIN ANALYZE of each route's
slowest statement. Figures are per request on a warm cache; they show what bounds a
route, ``api_scale.py`` what clients see.

    .venv/bin/python bench/api_profile.py --data DIR [--only NAMES] [--rounds 5] [--explain]
        [--statements] [--cprofile N]

``--statements`` lists the statements of each route's last request with their times;
``--cprofile N`` prints the N functions with the most own time over a route's requests
(``--ours``: Circus's functions by cumulative time). The ``first`` column is a route's
first request in the process (cold: templates, compiled statements); ``--warm`` warms
the app up first as circus-server's master does before forking its workers.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from api_scale import routes  # noqa: E402
from sqlalchemy import create_engine, event  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

from circus.auth import service as auth  # noqa: E402
from circus.auth.actor import Actor  # noqa: E402
from circus.cli.migrate import upgrade  # noqa: E402
from circus.common.config import load_settings  # noqa: E402
from circus.common.db import normalise_url  # noqa: E402
from circus.common.enums import Role  # noqa: E402
from circus.common.localservices import PrivatePostgres  # noqa: E402
from circus.server.app import create_app  # noqa: E402
from circus.server.warmup import warm_up  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=5, help="passes over each route's paths")
    parser.add_argument("--only", default="")
    parser.add_argument("--explain", action="store_true")
    parser.add_argument("--cprofile", type=int, default=0, metavar="N",
                        help="print each route's N functions of most own time (cProfile)")
    parser.add_argument("--statements", action="store_true",
                        help="print the statements of each route's last request, timed")
    parser.add_argument("--ours", action="store_true",
                        help="with --cprofile: Circus's own functions by cumulative time")
    parser.add_argument("--warm", action="store_true",
                        help="warm the app up first, as circus-server's master does")
    args = parser.parse_args()
    postgres = PrivatePostgres(args.data, durable=False)
    postgres.start()
    try:
        url = postgres.url("bench")
        upgrade(url)
        engine = create_engine(normalise_url(url))
        with Session(engine) as session:
            _, secret = auth.create_api_key(session, Actor.system("bench"),
                                            name=f"profile-{time.time_ns()}", role=Role.admin)
            session.commit()
        settings = load_settings(files=[], environ={}, overrides={
            "database": {"url": url}, "broker": {"url": "redis://127.0.0.1:1/0"},
            "server": {"secret_key": "x" * 40, "rate_limit_enabled": False,
                       "aggregate_cache_seconds": 0}})
        app = create_app(settings, engine=engine)
        client = app.test_client()
        if args.warm:
            warm_up(app)
        headers = {"Authorization": f"Bearer {secret}"}
        statements: list[tuple[float, str, Any]] = []
        started: dict[int, float] = {}

        @event.listens_for(engine, "before_cursor_execute")
        def before(conn: Any, cursor: Any, statement: str, params: Any, context: Any,
                   many: bool) -> None:
            started[id(cursor)] = time.perf_counter()

        @event.listens_for(engine, "after_cursor_execute")
        def after(conn: Any, cursor: Any, statement: str, params: Any, context: Any,
                  many: bool) -> None:
            statements.append((time.perf_counter() - started.pop(id(cursor)), statement,
                               params))

        print(f"{'route':<28} {'first':>7} {'ms':>7} {'sql ms':>7} {'stmts':>5}  "
              "slowest statement")
        for name, paths in routes(url):
            if args.only and not any(part in name for part in args.only.split(",")):
                continue
            profiler = cProfile.Profile() if args.cprofile else None
            totals, sql, counts = [], [], []
            slowest: tuple[float, str, Any] = (0.0, "", None)
            start = time.perf_counter()
            client.get(paths[0], headers=headers)
            first = (time.perf_counter() - start) * 1000
            for path in paths:  # warm-up
                client.get(path, headers=headers)
            for _ in range(args.rounds):
                for path in paths:
                    statements.clear()
                    start = time.perf_counter()
                    if profiler is not None:
                        profiler.enable()
                    response = client.get(path, headers=headers)
                    if profiler is not None:
                        profiler.disable()
                    totals.append((time.perf_counter() - start) * 1000)
                    assert response.status_code == 200, (path, response.status_code)
                    sql.append(sum(s for s, _, _ in statements) * 1000)
                    counts.append(len(statements))
                    slowest = max([slowest, *statements], key=lambda s: s[0])
            first_line = " ".join(slowest[1].split())[:90]
            print(f"{name:<28} {first:>7.1f} {statistics.median(totals):>7.1f} "
                  f"{statistics.median(sql):>7.1f} "
                  f"{statistics.median(counts):>5.0f}  {slowest[0] * 1000:.1f} ms: {first_line}",
                  flush=True)
            if args.statements:
                for seconds, statement, _ in statements:
                    print(f"    {seconds * 1000:6.2f} ms  {' '.join(statement.split())[:110]}")
            if profiler is not None:
                out = io.StringIO()
                pstats.Stats(profiler, stream=out).sort_stats(
                    "cumulative" if args.ours else "tottime").print_stats(
                    "circus/" if args.ours else "", args.cprofile)
                print(out.getvalue(), flush=True)
            if args.explain and slowest[1]:
                with engine.connect() as conn:
                    plan = conn.exec_driver_sql("EXPLAIN (ANALYZE, BUFFERS) " + slowest[1],
                                                slowest[2])
                    print("\n".join("    " + row[0] for row in plan), flush=True)
        engine.dispose()
        return 0
    finally:
        postgres.stop()


if __name__ == "__main__":
    sys.exit(main())
