"""Soak: a ``circus up`` instance under steady triggers; memory and dispatch latency over time.

Every round commits a new revision of the instance's demo repository with
``--jobs`` fresh sleeping derivations (a new nonce each round, so nothing is
cached) and triggers the jobset over the API, like a busy team pushing. At the
end it prints, per round, how many builds finished and the dispatch latency
(evaluation committed → build started) p50/p99, and each daemon's resident
memory (its whole process tree) at the start and the end, with the growth.

Not a test: it runs for ``--minutes`` (20 by default, 2,000+ builds).
Run: ``.venv/bin/python bench/soak.py [--minutes 20] [--jobs 100] [--round-seconds 60]``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from circus.common.localservices import PrivatePostgres  # noqa: E402
from tests.helpers.circus_up import Client, remove_instance, start  # noqa: E402
from tests.helpers.net import free_port  # noqa: E402

FLAKE = r"""{
  outputs = { self }:
    let
      system = "x86_64-linux";
      job = i: derivation {
        name = "soak-ROUND-${toString i}";
        inherit system;
        builder = "/bin/sh";
        args = [ "-c" "sleep 0.2; echo NONCE ${toString i} > $out" ];
      };
    in {
      hydraJobs = builtins.listToAttrs (builtins.genList (i: {
        name = "soak_${toString i}";
        value = job i;
      }) JOBS);
    };
}
"""


def tree_rss_kib(root: int) -> int:
    """Resident memory of a process and all its descendants."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        pid = int(entry.name)
        ppid = int(re.search(r"PPid:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
        found = re.search(r"VmRSS:\s+(\d+)", status)
        rss[pid] = int(found.group(1)) if found else 0
        children.setdefault(ppid, []).append(pid)
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo.extend(children.get(pid, []))
    return total


def daemon_rss(state: Path) -> dict[str, int]:
    status = json.loads((state / "supervisor.json").read_text())
    return {name: tree_rss_kib(info["pid"]) for name, info in status["daemons"].items()
            if info["pid"]}


def commit_round(repo: Path, round_no: int, jobs: int) -> None:
    text = FLAKE.replace("ROUND", str(round_no)).replace("NONCE", secrets.token_hex(8))
    (repo / "flake.nix").write_text(text.replace("JOBS", str(jobs)))
    env = {**os.environ, "GIT_AUTHOR_NAME": "soak", "GIT_AUTHOR_EMAIL": "soak@localhost",
           "GIT_COMMITTER_NAME": "soak", "GIT_COMMITTER_EMAIL": "soak@localhost"}
    subprocess.run(["git", "commit", "-qam", f"soak round {round_no}"], cwd=repo, env=env,
                   check=True)


def build_rows(state: Path) -> list[tuple[str, float, float | None, bool]]:
    """(job name, created, started, finished) of every soak build, from the database."""
    socket_dir = PrivatePostgres(state / "postgres").socket_dir
    query = ("SELECT nix_name, extract(epoch from created_at), extract(epoch from started_at), "
             "completed_at IS NOT NULL FROM builds WHERE nix_name LIKE 'soak-%'")
    done = subprocess.run(["psql", "-h", str(socket_dir), "-U", "postgres", "-d", "circus",
                           "-tA", "-F", "\t", "-c", query], capture_output=True, text=True,
                          check=True)
    rows = []
    for line in done.stdout.splitlines():
        name, created, started, finished = line.split("\t")
        rows.append((name, float(created or 0), float(started) if started else None,
                     finished == "t"))
    return rows


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=20)
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--round-seconds", type=float, default=60)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="circus-soak-", dir="/tmp"))
    root.chmod(0o755)
    state = root / "state"
    port = free_port()
    up, password, _ = start(state, port, root)
    try:
        api = Client(f"http://127.0.0.1:{port}", password)
        time.sleep(5)   # the demo's own first evaluation
        rss_start = daemon_rss(state)
        started = time.monotonic()
        rounds: list[float] = []
        while time.monotonic() - started < args.minutes * 60:
            round_no = len(rounds)
            commit_round(state / "demo-repo", round_no, args.jobs)
            api.post("/api/v1/evaluations/trigger", {"project": "demo", "jobset": "main"})
            rounds.append(time.monotonic() - started)
            print(f"round {round_no} triggered at {rounds[-1]:.0f} s; rss "
                  f"{ {k: v // 1024 for k, v in daemon_rss(state).items()} } MiB", flush=True)
            time.sleep(max(0.0, args.round_seconds - (time.monotonic() - started - rounds[-1])))
        expected = len(rounds) * args.jobs
        wait_until = time.monotonic() + 600
        while time.monotonic() < wait_until:
            rows = build_rows(state)
            if len(rows) >= expected and all(r[3] for r in rows):
                break
            time.sleep(2)
        rss_end = daemon_rss(state)
        rows = build_rows(state)
        print(f"\n{len(rounds)} rounds, {len(rows)} builds "
              f"({sum(r[3] for r in rows)} finished, {expected} expected) in "
              f"{(time.monotonic() - started) / 60:.1f} min")
        print("round  builds  dispatch p50  p99 (s, evaluation committed -> build started)")
        for round_no in range(len(rounds)):
            latencies = [r[2] - r[1] for r in rows
                         if r[0].startswith(f"soak-{round_no}-") and r[2] is not None]
            print(f"{round_no:5d}  {len(latencies):6d}  {percentile(latencies, 0.5):12.2f}  "
                  f"{percentile(latencies, 0.99):5.2f}")
        every = [r[2] - r[1] for r in rows if r[2] is not None]
        if every:
            print(f"all    {len(every):6d}  {statistics.median(every):12.2f}  "
                  f"{percentile(every, 0.99):5.2f}")
        print("\ndaemon                 RSS start MiB  end MiB  growth")
        for name in sorted(rss_start):
            before, after = rss_start[name] / 1024, rss_end.get(name, 0) / 1024
            print(f"{name:22s} {before:13.0f}  {after:7.0f}  {(after / before - 1) * 100:+5.0f}%")
        return 0 if len(rows) == expected and all(r[3] for r in rows) else 1
    finally:
        up.stop(timeout=90)
        remove_instance(state)   # what a failed stop left running, and the cluster
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
