"""Build overhead of Circus against ``nix-build -j2`` on a 500-derivation DAG.

Both sides build fresh store paths (a new nonce per run) of the same shape:
``chains`` chains of ``length`` trivial derivations, ``fans`` nodes depending on
every chain's tip, and one top node (20 * 24 + 19 + 1 = 500 by default).

- baseline: ``nix-build -j2`` of the top derivation;
- Circus: a private PostgreSQL and Redis, one ``circus-queue-runner`` with
  ``workers = 2``; the "evaluation" commits one build per job with
  ``pg_notify('circus_builds')`` (exactly what the evaluator does); the clock
  runs from that commit until every build is finished.

Prints both times, the ratio, and the latency from the commit to the first
step starting. Run: ``.venv/bin/python bench/build_overhead.py [--jobs all|tips]``.

``--e2e`` measures end to end instead (``bench/build_overhead_e2e.py``): a
``circus up`` instance, the DAG in a git repository, a trigger over the API,
until every build has finished; evaluation included on both sides. ``--small``
shrinks the DAG for a quick run.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from circus.cli.migrate import upgrade  # noqa: E402
from circus.common.db import normalise_url  # noqa: E402
from circus.common.localservices import PrivatePostgres, PrivateRedis  # noqa: E402
from circus.common.messaging import BUILDS_CHANNEL  # noqa: E402
from circus.common.nix.environment import nix_environ, sandbox_options  # noqa: E402

DAG = r"""
{ nonce, chains, length, fans }:
let
  mk = name: deps: derivation {
    inherit name nonce deps;
    builder = "/bin/sh";
    args = [ "-c" "echo $name > $out" ];
    system = builtins.currentSystem;
  };
  range = n: builtins.genList (i: i) n;
  chain = c: builtins.foldl' (acc: i: acc ++ [ (mk "c${toString c}-${toString i}"
    (if acc == [ ] then [ ] else [ (builtins.elemAt acc (builtins.length acc - 1)) ])) ])
    [ ] (range length);
  chainsList = map chain (range chains);
  tips = map (c: builtins.elemAt c (length - 1)) chainsList;
  fanList = map (k: mk "fan${toString k}" tips) (range fans);
  top = mk "top" fanList;
  nodes = builtins.concatLists (builtins.genList (c: builtins.genList (i: {
      name = "c${toString c}_${toString i}";
      value = builtins.elemAt (builtins.elemAt chainsList c) i;
    }) length) chains)
    ++ builtins.genList (k: { name = "fan${toString k}"; value = builtins.elemAt fanList k; }) fans
    ++ [ { name = "top"; value = top; } ];
in builtins.listToAttrs nodes
"""


def instantiate(expr: Path, nonce: str, shape: dict[str, int], attrs: list[str],
                env: dict[str, str]) -> dict[str, str]:
    argv = ["nix-instantiate", str(expr), "--argstr", "nonce", nonce]
    for key, value in shape.items():
        argv += ["--arg", key, str(value)]
    for attr in attrs:
        argv += ["-A", attr]
    out = subprocess.run(argv, capture_output=True, text=True, env=env, check=True).stdout
    return dict(zip(attrs, out.split(), strict=True))


def job_names(shape: dict[str, int], which: str) -> list[str]:
    tips = [f"c{c}_{shape['length'] - 1}" for c in range(shape["chains"])]
    fans = [f"fan{k}" for k in range(shape["fans"])]
    if which == "top":
        return ["top"]
    if which == "tips":
        return [*tips, *fans, "top"]
    return [f"c{c}_{i}" for c in range(shape["chains"]) for i in range(shape["length"])] + \
        fans + ["top"]


def baseline(expr: Path, shape: dict[str, int], env: dict[str, str]) -> float:
    drv = instantiate(expr, secrets.token_hex(8), shape, ["top"], env)["top"]
    before = os.times()
    start = time.monotonic()
    subprocess.run(["nix-build", "-j2", "--no-out-link", drv], check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    elapsed = time.monotonic() - start
    after = os.times()
    BASELINE_CPU.append(after.children_user + after.children_system
                        - before.children_user - before.children_system)
    return elapsed


BASELINE_CPU: list[float] = []
#: more CIRCUS_* settings for the runner (``--set cache.enabled=false``)
EXTRA_ENV: dict[str, str] = {}


class Instance:
    """Private PostgreSQL + Redis + one circus-queue-runner."""

    def __init__(self, state: Path, runner: dict[str, Any]) -> None:
        self.state = state
        self.pg = PrivatePostgres(state / "pg", durable=False)
        self.redis = PrivateRedis(state / "redis", durable=False)
        self.runner_overrides = runner
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.pg.start()
        self.pg.create_database("circus")
        self.redis.start()
        self.url = self.pg.url("circus")
        upgrade(self.url)
        self.engine = create_engine(normalise_url(self.url))
        with self.engine.begin() as conn:
            conn.execute(text("""
                INSERT INTO projects (name) VALUES ('bench') ON CONFLICT DO NOTHING;
                INSERT INTO jobsets (project_id, name)
                SELECT id, 'dag' FROM projects WHERE name = 'bench' ON CONFLICT DO NOTHING;
            """))

    def start_runner(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CIRCUS_")}
        env.update({
            "CIRCUS_DATABASE__URL": self.url,
            "CIRCUS_BROKER__URL": self.redis.url,
            "CIRCUS_NIX__SUBSTITUTERS": "[]",
            "CIRCUS_LOGS__LOG_DIR": str(self.state / "logs"),
            "CIRCUS_GC__GC_ROOTS_DIR": str(self.state / "gcroots"),
            "CIRCUS_CACHE__CACHE_DIR": str(self.state / "cache"),
            "CIRCUS_TRACING__LEVEL": os.environ.get("BENCH_LOG_LEVEL", "WARNING"),
        })
        env.update(EXTRA_ENV)
        for key, value in self.runner_overrides.items():
            env[f"CIRCUS_QUEUE_RUNNER__{key.upper()}"] = \
                json.dumps(value) if isinstance(value, (list, bool)) else str(value)
        log = (self.state / "runner.log").open("ab")
        self.process = subprocess.Popen(
            [str(Path(sys.executable).parent / "circus-queue-runner"), "--name", "bench"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with self.engine.connect() as conn:
                if conn.execute(text("SELECT count(*) FROM service_heartbeats")).scalar_one():
                    break
            time.sleep(0.2)
        time.sleep(2)  # let the Celery consumer subscribe

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(30)
        self.engine.dispose()
        self.redis.stop()
        self.pg.stop()

    def trigger(self, drvs: dict[str, str]) -> tuple[float, datetime]:
        """Commit an evaluation with one build per job, like the evaluator; returns
        (monotonic time, wall time) of the commit."""
        from circus.common.nix.derivation import read_derivation

        outputs = {job: read_derivation(drv).outputs["out"].path for job, drv in drvs.items()}
        with self.engine.connect() as conn:
            trans = conn.begin()
            jobset, project = conn.execute(text(
                "SELECT id, project_id FROM jobsets WHERE name = 'dag'")).one()
            eval_id = conn.execute(text("""
                INSERT INTO evaluations (jobset_id, trigger_kind, status)
                VALUES (:j, 'manual', 'completed') RETURNING id"""), {"j": jobset}).scalar_one()
            jobs = sorted(drvs)
            ids = conn.execute(text("""
                INSERT INTO builds (evaluation_id, jobset_id, project_id, job_name, drv_path,
                                    system)
                SELECT :e, :j, :p, v.job, v.drv, 'x86_64-linux'
                FROM unnest(CAST(:jobs AS text[]), CAST(:drvs AS text[])) AS v(job, drv)
                RETURNING id, job_name"""), {"e": eval_id, "j": jobset, "p": project,
                                             "jobs": jobs,
                                             "drvs": [drvs[j] for j in jobs]}).all()
            by_job = {job: build_id for build_id, job in ids}
            conn.execute(text("""
                INSERT INTO build_outputs (build_id, name, path)
                SELECT * FROM unnest(CAST(:ids AS bigint[]), CAST(:names AS text[]),
                                     CAST(:paths AS text[]))"""),
                         {"ids": [by_job[j] for j in jobs], "names": ["out"] * len(jobs),
                          "paths": [outputs[j] for j in jobs]})
            conn.execute(text("""
                INSERT INTO evaluation_builds (evaluation_id, build_id, is_new)
                SELECT :e, unnest(CAST(:ids AS bigint[])), true"""),
                         {"e": eval_id, "ids": list(by_job.values())})
            conn.execute(text("SELECT pg_notify(:channel, :e)"),
                         {"channel": BUILDS_CHANNEL, "e": str(eval_id)})
            trans.commit()
            return time.monotonic(), datetime.now(UTC)

    def wait_all_finished(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.engine.connect() as conn:
                left = conn.execute(text(
                    "SELECT count(*) FROM builds WHERE status IN (0, 1)")).scalar_one()
            if not left:
                return
            time.sleep(0.02)
        raise TimeoutError("builds did not finish")

    def report(self, committed_at: datetime) -> dict[str, Any]:
        time.sleep(1.5)  # the heartbeat carries the worker's counters
        with self.engine.connect() as conn:
            first_claim = conn.execute(text(
                "SELECT min(started_at) FROM steps")).scalar_one()
            statuses = dict(conn.execute(text(
                "SELECT status, count(*) FROM builds GROUP BY status")).all())
            details = conn.execute(text(
                "SELECT details FROM service_heartbeats ORDER BY last_heartbeat DESC LIMIT 1"
            )).scalar()
            steps = conn.execute(text("SELECT count(*) FROM steps")).scalar_one()
            retried = conn.execute(text(
                "SELECT count(*) FROM steps WHERE attempts > 0")).scalar_one()
            if os.environ.get("BENCH_DEBUG"):
                for row in conn.execute(text("""
                    SELECT s.id, s.drv_path, s.created_at, s.queued_at, s.started_at,
                           s.finished_at, s.status FROM steps s
                    WHERE drv_path IN (SELECT drv_path FROM steps GROUP BY drv_path
                                       HAVING count(*) > 1) ORDER BY drv_path, id""")):
                    print("DUP", row)
            conn.execute(text("TRUNCATE builds, steps, evaluations, queue_classes, "
                              "failed_paths CASCADE"))
            conn.commit()
        return {"first_step_latency": (first_claim - committed_at).total_seconds(),
                "statuses": statuses, "steps": steps, "retried": retried,
                "stats": (details or {}).get("stats")}


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(own, waited-for children) CPU seconds of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / tick, (int(fields[13]) + int(fields[14])) / tick


def _parent_is(pid: int, instance: Instance) -> bool:
    """Whether ``pid`` is a backend of this instance's postmaster."""
    try:
        ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        return str(instance.pg.data_dir).encode() in Path(f"/proc/{ppid}/cmdline").read_bytes()
    except (OSError, ValueError, IndexError):
        return False


def postgres_cpu(instance: Instance) -> float:
    total = 0.0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if str(instance.pg.data_dir).encode() in cmd or (
                cmd.startswith(b"postgres: ") and _parent_is(int(pid), instance)):
            try:
                own, _ = cpu_seconds(int(pid))
            except (OSError, IndexError, ValueError):
                continue
            total += own
    return total


def circus_run(instance: Instance, expr: Path, shape: dict[str, int], jobs: str,
               env: dict[str, str]) -> dict[str, Any]:
    drvs = instantiate(expr, secrets.token_hex(8), shape, job_names(shape, jobs), env)
    assert instance.process is not None
    cpu_before = cpu_seconds(instance.process.pid)
    pg_before = postgres_cpu(instance)
    start, committed_at = instance.trigger(drvs)
    instance.wait_all_finished()
    elapsed = time.monotonic() - start
    cpu_after = cpu_seconds(instance.process.pid)
    pg_after = postgres_cpu(instance)
    report = instance.report(committed_at)
    report["pg_cpu"] = pg_after - pg_before
    report["time"] = elapsed
    report["runner_cpu"] = cpu_after[0] - cpu_before[0]
    report["nix_cpu"] = cpu_after[1] - cpu_before[1]
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chains", type=int, default=20)
    parser.add_argument("--length", type=int, default=24)
    parser.add_argument("--fans", type=int, default=19)
    parser.add_argument("--jobs", choices=["all", "tips", "top"], default="all",
                        help="which derivations are jobs (builds): every one, the chain tips "
                             "+ fans + top, or only top")
    parser.add_argument("--rounds", type=int, default=None,
                        help="rounds (default 2, with --e2e 5); the median is reported")
    parser.add_argument("--e2e", action="store_true",
                        help="end to end: circus up, trigger over the API, evaluation included")
    parser.add_argument("--small", action="store_true",
                        help="a 55-derivation DAG (5 chains of 10, 4 fans) for quick runs")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="another runner setting, e.g. cache.enabled=false")
    parser.add_argument("--keep-state", action="store_true", help="keep logs and databases")
    parser.add_argument("--set-circus", action="append", default=[],
                        metavar="SECTION.KEY=VALUE",
                        help="with --reference: a setting for this checkout's instance alone "
                             "(e.g. queue_runner.batch_size=64 against the same code)")
    parser.add_argument("--reference", type=Path, metavar="CHECKOUT",
                        help="with --e2e: also run another checkout's Circus (e.g. the main "
                             "branch) in every round, beside this one: a before/after on a "
                             "shared host")
    parser.add_argument("--critical-path", choices=["off", "on", "both"], default="off")
    parser.add_argument("--baseline-sandbox", action="store_true",
                        help="with --e2e: nix-build -j2 builds in Nix's sandbox with Circus's "
                             "default sandbox settings, as Circus's builds do (nix.sandbox is "
                             "true by default; a host's nix.conf may say sandbox = false)")
    parser.add_argument("--nix-calls", action="store_true",
                        help="with --e2e: log every Nix call of the instances and print the "
                             "CPU per kind of call each round")
    args = parser.parse_args()
    for item in args.set:
        key, _, value = item.partition("=")
        EXTRA_ENV["CIRCUS_" + key.upper().replace(".", "__")] = value
    shape = {"chains": args.chains, "length": args.length, "fans": args.fans}
    if args.small:
        shape = {"chains": 5, "length": 10, "fans": 4}
    if args.rounds is None:
        args.rounds = 5 if args.e2e else 2
    if args.e2e:
        import build_overhead_e2e

        own = {"CIRCUS_" + key.upper().replace(".", "__"): value for key, _, value in
               (item.partition("=") for item in args.set_circus)}
        # the sandbox costs a build ~10 ms of system CPU (namespaces, mounts): ~5 s of
        # the 500 derivations' ~14 s with nix-build -j2 on the 2-core host, 2026-12
        baseline_env = nix_environ([], extra=sandbox_options(True) if args.baseline_sandbox
                                   else None)
        return build_overhead_e2e.run(DAG, shape, args.rounds, baseline_env, EXTRA_ENV,
                                      args.verbose, args.keep_state, args.reference, own,
                                      args.nix_calls)
    total = shape["chains"] * shape["length"] + shape["fans"] + 1
    env = nix_environ([])
    state = Path(tempfile.mkdtemp(prefix="circus-bench-", dir="/tmp"))
    state.chmod(0o755)  # the postgres user must reach its data directory
    expr = state / "dag.nix"
    expr.write_text(DAG)
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.critical_path]
    print(f"DAG: {total} derivations ({shape}), jobs: {args.jobs}, rounds: {args.rounds}")
    instances: dict[bool, Instance] = {}
    rows: list[dict[str, Any]] = []
    try:
        for critical in modes:
            overrides: dict[str, Any] = {"workers": 2, "critical_path_first": critical,
                                         "poll_interval": 1}
            if args.batch_size:
                overrides["batch_size"] = args.batch_size
            instance = Instance(state / f"cp-{critical}", overrides)
            instances[critical] = instance
            instance.start()
            instance.start_runner()
        # rounds interleave the baseline and every mode, so load changes on the
        # machine hit them alike; ratios are taken within a round
        for round_nr in range(args.rounds):
            base = baseline(expr, shape, env)
            row: dict[str, Any] = {"baseline": base}
            line = f"  round {round_nr + 1}: nix-build -j2 {base:.2f} s"
            if args.verbose:
                line += f" (CPU {BASELINE_CPU[-1]:.2f} s)"
            for critical, instance in instances.items():
                run = circus_run(instance, expr, shape, args.jobs, env)
                row[critical] = run
                line += (f" | circus (critical path {'on' if critical else 'off'}) "
                         f"{run['time']:.2f} s = {run['time'] / base:.2f}x, first step "
                         f"{run['first_step_latency'] * 1000:.0f} ms")
                bad = {k: v for k, v in run["statuses"].items() if k != 2}
                if bad:
                    line += f" (NOT all succeeded: {run['statuses']})"
            print(line)
            if args.verbose:
                for critical in instances:
                    run = row[critical]
                    print(f"    steps {run['steps']} (retried {run['retried']}), "
                          f"runner CPU {run['runner_cpu']:.2f} s, nix-store CPU "
                          f"{run['nix_cpu']:.2f} s, PostgreSQL CPU {run['pg_cpu']:.2f} s, "
                          f"counters {run['stats']}")
            rows.append(row)
    finally:
        for instance in instances.values():
            instance.stop()
        if args.keep_state:
            print(f"state kept in {state}")
        else:
            shutil.rmtree(state, ignore_errors=True)
    print(f"\nnix-build -j2: median {statistics.median(r['baseline'] for r in rows):.2f} s")
    for critical in instances:
        ratios = [r[critical]["time"] / r["baseline"] for r in rows]
        times = [r[critical]["time"] for r in rows]
        latency = [r[critical]["first_step_latency"] for r in rows]
        print(f"circus, critical path {'on ' if critical else 'off'}: median "
              f"{statistics.median(times):.2f} s, ratio median {statistics.median(ratios):.2f}x "
              f"(min {min(ratios):.2f}, max {max(ratios):.2f}), first step after median "
              f"{statistics.median(latency) * 1000:.0f} ms (max {max(latency) * 1000:.0f} ms)")
    if len(instances) == 2:
        diff = [r[True]["time"] - r[False]["time"] for r in rows]
        print(f"critical path first: makespan difference (on - off) median "
              f"{statistics.median(diff):+.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
