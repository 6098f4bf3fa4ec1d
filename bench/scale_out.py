"""Scale-out of remote Celery workers: N one-second derivations on 1, 2 and 3 hosts.

Every "host" is a network namespace with its own address and its own ``/nix``
(tests/helpers/netns.py) running one ``circus-worker`` with 2 slots; PostgreSQL,
a TCP Redis broker, circus-server and a dispatcher-only queue runner live in the
main namespace, so each step's .drv travels to the worker and its output back
through the server's API, as on real separate machines. Each round builds fresh
derivations (a new nonce) that each ``sleep 1``; the clock runs from the commit of
the "evaluation" until every build is finished.

Prints the makespan per host count, the ideal (N / (2 * hosts) s), the speed-up
against one host and its ratio to the ideal speed-up (hosts * 1). The baseline is
the same run's one-host round. Needs root (network namespaces, bind mounts).

Run: ``.venv/bin/python bench/scale_out.py [--small] [--steps N] [--hosts 1,2,3]``
(default 300 steps; ``--small`` 60).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from build_overhead import Instance  # noqa: E402
from sqlalchemy import text  # noqa: E402

from circus.common.enums import BuildStatus  # noqa: E402
from circus.common.nix.environment import nix_environ  # noqa: E402
from circus.common.nix.signing import generate_key_pair  # noqa: E402
from tests.helpers.daemons import Daemon, wait_until  # noqa: E402
from tests.helpers.net import free_port, wait_for_port  # noqa: E402
from tests.helpers.netns import network_host  # noqa: E402
from tests.helpers.tcp_redis import tcp_redis  # noqa: E402
from tests.helpers.worker_hosts import ready, worker_on_host  # noqa: E402
from tests.queue_runner.daemons import flatten  # noqa: E402

SLEEPERS = r"""
{ nonce, n }:
builtins.listToAttrs (builtins.genList (i: {
  name = "s${toString i}";
  value = derivation {
    name = "sleeper-${toString i}";
    inherit nonce;
    builder = "/bin/sh";
    args = [ "-c" "export PATH=/usr/bin:/bin; sleep 1; echo $name > $out" ];
    system = builtins.currentSystem;
  };
}) n)
"""
TOKEN = "scale-out-token-" + secrets.token_hex(16)
CACHE_KEY = generate_key_pair("scale-out-cache-1")[0]
SLOTS = 2
#: the hosts reach the server at their main_address, one per veth pair
ALL_INTERFACES = "0.0.0.0"  # noqa: S104


def instantiate(expr: Path, count: int, env: dict[str, str]) -> dict[str, str]:
    attrs = [f"s{i}" for i in range(count)]
    argv = ["nix-instantiate", str(expr), "--argstr", "nonce", secrets.token_hex(8),
            "--arg", "n", str(count)]
    for attr in attrs:
        argv += ["-A", attr]
    out = subprocess.run(argv, capture_output=True, text=True, env=env, check=True).stdout
    return dict(zip(attrs, out.split(), strict=True))


def services_env(instance: Instance, broker_url: str, state: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CIRCUS_")}
    env["PYTHONPATH"] = str(ROOT)
    env.update(flatten({
        "database": {"url": instance.url},
        "broker": {"url": broker_url},
        "nix": {"substituters": []},
        "logs": {"log_dir": str(state / "logs")},
        "gc": {"gc_roots_dir": str(state / "gcroots")},
        "cache": {"cache_dir": str(state / "cache")},
        "queue_runner": {"unsupported_timeout": 600},
        "remote_workers": {"auth_tokens": [hashlib.sha256(TOKEN.encode()).hexdigest()]},
        # workers substitute their inputs from /nix-cache and trust only its signature
        "signing": {"enabled": True, "key": CACHE_KEY},
        # off, so the benchmark measures scheduling, not the limiter
        "server": {"secret_key": secrets.token_hex(24), "workers": 2,
                   "rate_limit_enabled": False, "require_api_key_for_reads": False},
        "tracing": {"level": os.environ.get("BENCH_LOG_LEVEL", "WARNING")},
    }))
    return env


def round_with(hosts: int, instance: Instance, expr: Path, count: int, port: int,
               broker_url_for: Callable[[str], str], state: Path, nix_env: dict[str, str]) -> float:
    """Build ``count`` fresh sleepers on ``hosts`` worker hosts; returns the makespan."""
    drvs = instantiate(expr, count, nix_env)
    directory = state / f"hosts-{hosts}"
    with ExitStack() as stack:
        workers = []
        for index in range(hosts):
            name = f"h{hosts}-{index}"
            host = stack.enter_context(network_host(nix_store=directory / name / "nix"))
            worker = stack.enter_context(worker_on_host(
                host, directory / name, name, port, broker_url_for(host.main_address), TOKEN,
                slots=SLOTS))
            workers.append((name, worker))
        for name, worker in workers:
            wait_until(lambda worker=worker, name=name: ready(worker, name), timeout=120,
                       message=f"worker {name} consuming")
        time.sleep(2)   # the first heartbeats subscribe the class queue
        started, _ = instance.trigger(drvs)
        instance.wait_all_finished(timeout=max(600, count * 4))
        makespan = time.monotonic() - started
        with instance.engine.begin() as conn:
            statuses: dict[int, int] = dict(conn.execute(text(
                "SELECT status, count(*) FROM builds GROUP BY status")).all())
            per_host: dict[str, int] = dict(conn.execute(text(
                "SELECT machine, count(*) FROM steps GROUP BY machine ORDER BY machine"
            )).all())
            conn.execute(text("TRUNCATE builds, steps, evaluations, queue_classes, "
                              "failed_paths CASCADE"))
    failed = sum(n for status, n in statuses.items() if status != BuildStatus.succeeded)
    if failed:
        raise RuntimeError(f"{failed} build(s) did not succeed: {statuses} (see {directory})")
    print(f"  {hosts} host(s): makespan {makespan:6.1f} s, steps per host {per_host}, "
          f"build statuses {statuses}", flush=True)
    return makespan


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="60 steps")
    parser.add_argument("--steps", type=int, help="how many 1 s derivations (default 300)")
    parser.add_argument("--hosts", default="1,2,3", help="host counts, comma-separated")
    args = parser.parse_args(argv)
    count = args.steps or (60 if args.small else 300)
    host_counts = [int(h) for h in args.hosts.split(",")]
    if os.geteuid() != 0:
        print("scale_out needs root (network namespaces)", file=sys.stderr)
        return 2
    nix_env = nix_environ([])
    state = Path(tempfile.mkdtemp(prefix="circus-scale-out-", dir="/tmp"))
    # the postgres user must reach its data directory: else the cluster lives in
    # /var/lib/circus/postgres-<digest>, which the rmtree below never removed
    state.chmod(0o755)
    expr = state / "sleepers.nix"
    expr.write_text(SLEEPERS)
    instance = Instance(state, {})
    makespans: dict[int, float] = {}
    try:
        instance.start()
        with tcp_redis(state / "broker") as redis, ExitStack() as stack:
            env = services_env(instance, redis.url, state)
            port = free_port()
            server = Daemon("circus-server", [sys.executable, "-m", "circus.server.main",
                                              "--host", ALL_INTERFACES, "--port", str(port)],
                            state, env=env)
            runner = Daemon("circus-queue-runner", [
                sys.executable, "-m", "circus.queue_runner.main", "--name", "scale-out",
                "--workers", "0"], state, env=env)
            stack.enter_context(runner)
            stack.enter_context(server)
            wait_for_port(port, timeout=60)
            print(f"scale_out: {count} derivations of 1 s, {SLOTS} slots per host", flush=True)
            for hosts in host_counts:
                makespans[hosts] = round_with(hosts, instance, expr, count, port,
                                              redis.url_for, state, nix_env)
    finally:
        instance.stop()
        shutil.rmtree(state, ignore_errors=True)
    base_hosts = min(makespans)
    base = makespans[base_hosts] * base_hosts
    # speed-up: against the same run's smallest round, scaled to one host; "of ideal"
    # divides it by the host count (1.00: every added host fully used)
    print(f"{'hosts':>5} {'makespan s':>10} {'ideal s':>8} {'speed-up':>8} "
          f"{'of ideal':>8}")
    for hosts, makespan in sorted(makespans.items()):
        speed_up = base / makespan
        print(f"{hosts:>5} {makespan:>10.1f} {count / (SLOTS * hosts):>8.1f} "
              f"{speed_up:>8.2f} {speed_up / hosts:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
