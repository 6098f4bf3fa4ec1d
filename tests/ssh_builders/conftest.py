"""Real ``sshd`` builders, each with its own Nix store (a private ``/nix`` mount)."""

from __future__ import annotations

import shlex
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from circus.common.models import RemoteBuilder
from tests.helpers.daemons import Daemon
from tests.helpers.net import free_port
from tests.queue_runner.conftest import qr_settings, runner_config  # noqa: F401  (shared fixtures)

SSHD = "/usr/sbin/sshd"
FIXTURES = Path(__file__).parent / "fixtures"
JOBS = FIXTURES / "jobs.nix"

#: Nix on the test builders: no substituters, and no nixbld build users — test
#: builders on one host share the kernel's users, and one builder's Nix cleaning
#: up "its" nixbld1 would kill another builder's build (docs/DISTRIBUTED.md)
BUILDER_NIX_CONFIG = {"build-users-group": ""}
BUILDER_PATH = "/usr/bin:/bin"


def keygen(path: Path, comment: str = "") -> str:
    """A new ed25519 key pair; returns the public key line."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f",
                    str(path)], check=True)
    return path.with_suffix(".pub").read_text().strip()


@dataclass
class SshHost:
    name: str
    directory: Path
    port: int
    host_key: str
    client_key: Path
    daemon: Daemon

    @property
    def store(self) -> Path:
        return self.directory / "nix"

    @property
    def uri(self) -> str:
        return f"ssh://root@127.0.0.1:{self.port}"

    def has(self, path: str) -> bool:
        """Is ``path`` valid in this builder's own store?"""
        script = (f"mount --bind {shlex.quote(str(self.store))} /nix && "
                  f"nix-store --check-validity {shlex.quote(path)}")
        done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                               script], capture_output=True)
        return done.returncode == 0

    def row(self, **fields: Any) -> RemoteBuilder:
        values: dict[str, Any] = {
            "name": self.name, "ssh_uri": self.uri, "systems": [current_system()],
            "max_jobs": 1, "speed_factor": 1.0, "supported_features": [],
            "mandatory_features": [], "ssh_key_file": str(self.client_key),
            "public_host_key": self.host_key}
        values.update(fields)
        return RemoteBuilder(**values)


def current_system() -> str:
    from circus.common.nix.environment import current_system as system

    return system()


def start_sshd(directory: Path, name: str, read_only_store: bool = False) -> SshHost:
    """sshd on a free port in a private mount namespace whose /nix is ``directory/nix``
    (``read_only_store``: mounted read-only, a builder whose Nix cannot work)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "nix").mkdir(exist_ok=True)
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
    host_key = keygen(directory / "host_ed25519", f"{name}-host")
    client_pub = keygen(directory / "client_ed25519", "circus-runner")
    (directory / "authorized_keys").write_text(client_pub + "\n")
    port = free_port()
    config = directory / "sshd_config"
    config.write_text("\n".join([
        f"HostKey {directory / 'host_ed25519'}",
        f"AuthorizedKeysFile {directory / 'authorized_keys'}",
        "ListenAddress 127.0.0.1",
        "PermitRootLogin prohibit-password",  # root by key only
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UsePAM no",
        "StrictModes no",
        "PidFile none",
        "MaxStartups 100",
        "MaxSessions 100",
        "LogLevel INFO",
    ]) + "\n")
    inner = " ".join(shlex.quote(a) for a in [SSHD, "-D", "-e", "-f", str(config),
                                               "-p", str(port)])
    mount = f"mount --bind {shlex.quote(str(directory / 'nix'))} /nix"
    if read_only_store:
        mount += " && mount -o remount,bind,ro /nix"
    script = f"{mount} && exec {inner}"
    daemon = Daemon(f"sshd-{name}", ["unshare", "--mount", "--propagation", "private",
                                     "sh", "-c", script], directory).start()
    deadline = time.monotonic() + 20
    while "Server listening" not in daemon.log():
        if not daemon.alive() or time.monotonic() > deadline:
            daemon.stop()
            raise RuntimeError(f"sshd did not start: {daemon.log()}")
        time.sleep(0.02)
    return SshHost(name, directory, port, host_key, directory / "client_ed25519", daemon)


@pytest.fixture
def ssh_host(tmp_path: Path) -> Iterator[Callable[..., SshHost]]:
    started: list[SshHost] = []

    def make(name: str, read_only_store: bool = False) -> SshHost:
        host = start_sshd(tmp_path / f"builder-{name}", name, read_only_store)
        started.append(host)
        return host

    yield make
    for host in started:
        host.daemon.stop()


def add_builders(factory: sessionmaker[Session], *rows: RemoteBuilder) -> dict[str, int]:
    with factory() as session:
        session.add_all(rows)
        session.commit()
        return {row.name: row.id for row in rows}


def ssh_settings(**runner: Any) -> dict[str, Any]:
    """``queue_runner`` keys every SSH test uses."""
    return {"ssh_remote_path": BUILDER_PATH, "ssh_nix_config": dict(BUILDER_NIX_CONFIG),
            "ssh_connect_timeout": 5, **runner}
