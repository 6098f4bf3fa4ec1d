"""Dispatch overhead per step: SSH builders against local workers.

The same N independent trivial derivations (fresh store paths each run) are built

- by ``nix-store --realise -j2`` (the floor),
- by a ``circus-queue-runner`` with two local workers,
- by a ``circus-queue-runner`` with no local workers and one SSH builder with
  ``max_jobs = 2``: a real ``sshd`` on this host in a private mount namespace
  with its own Nix store, so every step's inputs and outputs really travel.

Prints the times, the per-step wall time of each, and the SSH builders' extra
cost per step over local workers. Run: ``.venv/bin/python bench/ssh_overhead.py [-n 100]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from agent_overhead import compare_with_local  # noqa: E402
from build_overhead import Instance  # noqa: E402
from sqlalchemy import text  # noqa: E402

from circus.common.nix.environment import current_system  # noqa: E402
from tests.ssh_builders.conftest import SshHost, start_sshd  # noqa: E402


class SshInstance(Instance):
    """The queue runner with no local workers and one SSH builder of its own."""

    def __init__(self, state: Path, max_jobs: int) -> None:
        super().__init__(state, {
            "poll_interval": 1, "ssh_remote_path": "/usr/bin:/bin",
            "ssh_nix_config__build-users-group": ""})
        self.max_jobs = max_jobs
        self.host: SshHost | None = None

    def start_runner(self) -> None:
        import subprocess

        self.host = start_sshd(self.state / "builder", "bench")
        with self.engine.begin() as conn:
            conn.execute(text("""
                INSERT INTO remote_builders (name, ssh_uri, systems, max_jobs,
                    supported_features, mandatory_features, ssh_key_file, public_host_key)
                VALUES ('bench', :uri, :systems, :jobs, '{}', '{}', :key, :host_key)
            """), {"uri": self.host.uri, "systems": [current_system()], "jobs": self.max_jobs,
                   "key": str(self.host.client_key), "host_key": self.host.host_key})
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

    def stop(self) -> None:
        super().stop()
        if self.host is not None:
            self.host.daemon.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--count", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    state = Path(tempfile.mkdtemp(prefix="circus-bench-ssh-", dir="/tmp"))
    state.chmod(0o755)
    compare_with_local(SshInstance(state / "ssh", max_jobs=2), "SSH builder (2 jobs)", "SSH",
                       state, args.count, args.rounds)
    return 0

if __name__ == "__main__":
    sys.exit(main())
