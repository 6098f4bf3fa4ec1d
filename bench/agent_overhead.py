"""Dispatch overhead per step: agents over Cap'n Proto against local workers.

The same N independent trivial derivations (fresh store paths each run) are built

- by ``nix-build -j2`` (the floor),
- by a ``circus-queue-runner`` with two local workers,
- by a ``circus-queue-runner`` with no local workers and two agents (one job each),
  each agent in its own Nix store (a private mount namespace), so every step's
  inputs and outputs really travel over the protocol.

Prints the times, the per-step wall time of each, and the agents' extra cost per
step over local workers. Run: ``.venv/bin/python bench/agent_overhead.py [-n 200]``.
"""

from __future__ import annotations

import argparse
import hashlib
import secrets
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from build_overhead import Instance  # noqa: E402

from circus.common.nix.environment import nix_environ  # noqa: E402

FLAT = r"""
{ nonce, count }:
builtins.listToAttrs (builtins.genList (i: {
  name = "n${toString i}";
  value = derivation {
    name = "n${toString i}"; inherit nonce; builder = "/bin/sh";
    args = [ "-c" "echo ${toString i} > $out" ]; system = builtins.currentSystem;
  };
}) count)
"""
TOKEN = "bench-agent-token-" + secrets.token_hex(16)


def instantiate(expr: Path, count: int, env: dict[str, str]) -> dict[str, str]:
    nonce = secrets.token_hex(8)
    attrs = [f"n{i}" for i in range(count)]
    argv = ["nix-instantiate", str(expr), "--argstr", "nonce", nonce, "--arg", "count",
            str(count)]
    for attr in attrs:
        argv += ["-A", attr]
    out = subprocess.run(argv, capture_output=True, text=True, env=env, check=True).stdout
    return dict(zip(attrs, out.split(), strict=True))


def nix_build(expr: Path, count: int, env: dict[str, str]) -> float:
    drvs = instantiate(expr, count, env)
    start = time.monotonic()
    subprocess.run(["nix-store", "--realise", "-j2", *drvs.values()], check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.monotonic() - start


class GatewayInstance(Instance):
    """The queue runner with the gateway, no local workers, and agents of its own."""

    def __init__(self, state: Path, agents: int) -> None:
        port = _free_port()
        super().__init__(state, {
            "rpc__bind": f"127.0.0.1:{port}", "rpc__allow_plaintext": True,
            "rpc__auth_tokens": [hashlib.sha256(TOKEN.encode()).hexdigest()],
            "poll_interval": 1})
        self.port = port
        self.agent_count = agents
        self.agents: list[subprocess.Popen[bytes]] = []

    def start_runner(self) -> None:
        # Instance starts the runner with its configured workers; agents-only needs 0
        real_popen = subprocess.Popen

        def popen(argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
            if argv and argv[0].endswith("circus-queue-runner"):
                argv = [*argv, "--workers", "0"]
            return real_popen(argv, **kwargs)

        subprocess.Popen = popen  # type: ignore[assignment,misc]
        try:
            super().start_runner()
        finally:
            subprocess.Popen = real_popen  # type: ignore[misc]
        agent_bin = Path(sys.executable).parent / "circus-agent"
        for i in range(self.agent_count):
            directory = self.state / f"agent{i}"
            (directory / "nix").mkdir(parents=True, exist_ok=True)
            config = directory / "agent.toml"
            config.write_text(
                f'[agent]\nname = "bench{i}"\nrunner_url = "tcp://127.0.0.1:{self.port}"\n'
                f'auth_token = "{TOKEN}"\nwork_dir = "{directory / "work"}"\n'
                "max_jobs = 1\nsubstituters = []\n"
                '[agent.nix_config]\n"build-users-group" = ""\n')
            inner = f"{shlex.quote(str(agent_bin))} --config {shlex.quote(str(config))}"
            script = f"mount --bind {shlex.quote(str(directory / 'nix'))} /nix && exec {inner}"
            log = (directory / "agent.log").open("ab")
            self.agents.append(subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        from sqlalchemy import text

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with self.engine.connect() as conn:
                n = conn.execute(text(
                    "SELECT count(*) FROM builder_sessions WHERE connected")).scalar_one()
            if n == self.agent_count:
                return
            time.sleep(0.2)
        raise TimeoutError("agents did not connect")

    def stop(self) -> None:
        for agent in self.agents:
            agent.terminate()
            agent.wait(30)
        super().stop()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def circus(instance: Instance, expr: Path, count: int, env: dict[str, str]) -> float:
    drvs = instantiate(expr, count, env)
    start, committed_at = instance.trigger(drvs)
    instance.wait_all_finished()
    elapsed = time.monotonic() - start
    report = instance.report(committed_at)
    bad = {k: v for k, v in report["statuses"].items() if k != 2}
    if bad:
        raise RuntimeError(f"not every build succeeded: {report['statuses']}")
    return elapsed


def compare_with_local(remote: Instance, label: str, kind: str, state: Path, count: int,
                        rounds: int) -> None:
    """Rounds of nix-store -j2, local workers and ``remote`` on fresh flat derivations;
    prints the medians and the remote's overhead per step per slot (concurrency 2)."""
    env = nix_environ([])
    expr = state / "flat.nix"
    expr.write_text(FLAT)
    local = Instance(state / "local", {"workers": 2, "poll_interval": 1})
    rows = []
    try:
        for instance in (local, remote):
            instance.start()
            instance.start_runner()
        for round_nr in range(rounds):
            base = nix_build(expr, count, env)
            t_local = circus(local, expr, count, env)
            t_remote = circus(remote, expr, count, env)
            rows.append((base, t_local, t_remote))
            print(f"  round {round_nr + 1}: nix-store -j2 {base:.2f} s | local workers "
                  f"{t_local:.2f} s | {label} {t_remote:.2f} s")
    finally:
        for instance in (local, remote):
            try:
                instance.stop()
            except Exception as exc:
                print(f"stopping failed: {exc}", file=sys.stderr)
        shutil.rmtree(state, ignore_errors=True)
    base = statistics.median(r[0] for r in rows)
    t_local = statistics.median(r[1] for r in rows)
    t_remote = statistics.median(r[2] for r in rows)
    print(f"\n{count} independent derivations, medians of {len(rows)} round(s), "
          "concurrency 2:")
    print(f"  nix-store -j2 {base:.2f} s ({base / count * 1000:.1f} ms/step)")
    print(f"  local workers {t_local:.2f} s ({t_local / count * 1000:.1f} ms/step, "
          f"{t_local / base:.2f}x nix)")
    print(f"  {kind:<13} {t_remote:.2f} s ({t_remote / count * 1000:.1f} ms/step, "
          f"{t_remote / base:.2f}x nix, {t_remote / t_local:.2f}x local)")
    print(f"  {kind} overhead over local workers: "
          f"{(t_remote - t_local) / count * 1000 * 2:.1f} ms per step per slot")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--count", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    state = Path(tempfile.mkdtemp(prefix="circus-bench-agents-", dir="/tmp"))
    state.chmod(0o755)
    compare_with_local(GatewayInstance(state / "agents", agents=2), "2 agents", "agents",
                       state, args.count, args.rounds)
    return 0

if __name__ == "__main__":
    sys.exit(main())
