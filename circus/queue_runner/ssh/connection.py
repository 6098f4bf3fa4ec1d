"""One SSH connection per builder (fabric), shared by its build slots.

Fabric opens and authenticates the connection (``Connection.open``); every
command then runs on its own channel of that transport
(``Connection.create_session``), so a builder costs one TCP connection and one
host-key check however many steps it runs. Channels, not fabric's ``run``:
invoke's runner decodes output as text and feeds stdin in 1,000-byte polls,
while store paths travel as binary export streams and build logs must arrive
as they are written.

Every command runs as ``exec /bin/sh -c '<script>'`` under a prelude that
sets ``PATH`` (``queue_runner.ssh_remote_path``) and ``NIX_CONFIG``
(``[nix]`` substituters and sandbox, then ``queue_runner.ssh_nix_config``), so
the remote login's dotfiles matter as little as possible. A builder whose Nix
talks to a daemon as an untrusted user ignores ``sandbox`` and ``sandbox-paths``
from the client: there the builder's own nix.conf decides.
"""

from __future__ import annotations

import logging
import shlex
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fabric import Config, Connection
from paramiko import MissingHostKeyPolicy, PKey, SSHClient, SSHConfig, WarningPolicy
from paramiko.channel import Channel
from paramiko.ssh_exception import (
    AuthenticationException,
    BadHostKeyException,
    NoValidConnectionsError,
    SSHException,
)

from circus.queue_runner.ssh.hosts import SshTarget

log = logging.getLogger(__name__)

KEEPALIVE_SECS = 15


class RemoteError(Exception):
    """The builder could not be reached or used (infrastructure, not the build's fault)."""


class HostKeyRefused(RemoteError):
    pass


@dataclass(frozen=True)
class CommandResult:
    returncode: int
    stdout: bytes
    stderr: bytes

    def error_text(self) -> str:
        text = self.stderr.decode(errors="replace").strip()
        return "\n".join(text.splitlines()[-10:]) or f"exit status {self.returncode}"


class _RefuseUnknown(MissingHostKeyPolicy):  # type: ignore[misc]
    """The builder offered no key of a type ``public_host_key`` lists."""

    def missing_host_key(self, client: SSHClient, hostname: str, key: PKey) -> None:
        raise HostKeyRefused(
            f"host key refused: {hostname} offered {key.get_name()} {key.fingerprint}, "
            "which public_host_key does not list")


def remote_prelude(path: str | None, nix_config: str) -> str:
    lines = []
    if path:
        lines.append(f"PATH={shlex.quote(path)}; export PATH")
    if nix_config:
        lines.append(f"NIX_CONFIG={shlex.quote(nix_config)}; export NIX_CONFIG")
    return "\n".join(lines)


def remote_nix_config(substituters: list[str] | None, trusted_public_keys: list[str] | None,
                      extra: Mapping[str, str]) -> str:
    """nix.conf lines for Nix on a builder: the runner's ``[nix]`` policy, then the extras."""
    lines = []
    if substituters is not None:
        lines.append(f"substituters = {' '.join(substituters)}")
    if trusted_public_keys is not None:
        lines.append(f"trusted-public-keys = {' '.join(trusted_public_keys)}")
    lines += [f"{key} = {value}" for key, value in extra.items()]
    return "\n".join(lines)


class Remote:
    """A builder's connection; thread-safe, reconnects after a failure."""

    def __init__(self, name: str, target: SshTarget, *, key_file: str | None,
                 host_keys: list[PKey] | None, connect_timeout: float,
                 prelude: str = "") -> None:
        self.name = name
        self.target = target
        self.key_file = key_file
        self.host_keys = host_keys
        self.connect_timeout = connect_timeout
        self.prelude = prelude
        self._lock = threading.Lock()
        self._connection: Connection | None = None

    # ------------------------------------------------------------ connecting

    def _new_connection(self) -> Connection:
        # an empty SSH config: ~/.ssh/config and /etc/ssh/ssh_config must not change
        # which host, user or key a builder row means
        config = Config(ssh_config=SSHConfig(), lazy=True)
        connect_kwargs: dict[str, Any] = {"allow_agent": False, "look_for_keys": False,
                                          "banner_timeout": self.connect_timeout,
                                          "auth_timeout": self.connect_timeout}
        if self.key_file:
            connect_kwargs["key_filename"] = self.key_file
        else:
            # no key configured: whatever the runner's user has (agent, ~/.ssh/id_*)
            connect_kwargs.update(allow_agent=True, look_for_keys=True)
        connection = Connection(self.target.host, user=self.target.user or None,
                                port=self.target.port, config=config,
                                connect_timeout=int(max(1, self.connect_timeout)),
                                connect_kwargs=connect_kwargs)
        client = connection.client
        if self.host_keys:
            stored = client.get_host_keys()
            for name in self.target.known_hosts_names():
                for key in self.host_keys:
                    stored.add(name, key.get_name(), key)
            client.set_missing_host_key_policy(_RefuseUnknown())
        else:
            # only reachable with ssh_require_host_key = false
            client.set_missing_host_key_policy(WarningPolicy())
        return connection

    def connect(self) -> None:
        with self._lock:
            if self._connection is not None and self._connection.is_connected:
                return
            self._close_locked()
            connection = self._new_connection()
            try:
                connection.open()
            except HostKeyRefused:
                connection.close()
                raise
            except BadHostKeyException as exc:
                connection.close()
                raise HostKeyRefused(
                    f"host key mismatch: {self.target.host}:{self.target.port} offered "
                    f"{exc.key.get_name()} {exc.key.fingerprint}, public_host_key has "
                    f"{exc.expected_key.fingerprint}") from None
            except AuthenticationException as exc:
                connection.close()
                key = self.key_file or "the runner's default keys"
                raise RemoteError(f"authentication as {self.target.user or 'the runner user'} "
                                  f"failed with {key}: {exc}") from None
            except NoValidConnectionsError as exc:
                connection.close()
                raise RemoteError(f"cannot connect to {self.target}: "
                                  f"{_reasons(exc)}") from None
            except (SSHException, OSError, EOFError) as exc:
                connection.close()
                raise RemoteError(f"cannot connect to {self.target}: "
                                  f"{exc or type(exc).__name__}") from None
            transport = connection.transport
            assert transport is not None
            transport.set_keepalive(KEEPALIVE_SECS)
            try:
                # small request/response packets: without this, Nagle and delayed ACKs
                # add 40 ms to every channel opened
                transport.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except (OSError, AttributeError):
                pass
            self._connection = connection
            log.info("connected to SSH builder %s (%s)", self.name, self.target)

    def close(self) -> None:
        with self._lock:
            self._close_locked()

    def _close_locked(self) -> None:
        if self._connection is not None:
            try:
                self._connection.close()
            except Exception:  # closing a broken connection may raise anything
                log.debug("closing the connection to %s failed", self.name, exc_info=True)
            self._connection = None

    # ------------------------------------------------------------ commands

    def command_line(self, script: str) -> str:
        body = f"{self.prelude}\n{script}" if self.prelude else script
        return f"exec /bin/sh -c {shlex.quote(body)}"

    def open(self, script: str) -> Channel:
        """Start ``script`` on a new channel (connecting first when needed)."""
        self.connect()
        with self._lock:
            connection = self._connection
        try:
            if connection is None:
                raise SSHException("connection closed")
            channel: Channel = connection.create_session()
            channel.exec_command(self.command_line(script))
        except (SSHException, OSError, EOFError) as exc:
            self.close()
            raise RemoteError(f"{self.name}: cannot start a command: "
                              f"{exc or type(exc).__name__}") from None
        return channel

    def run(self, script: str, stdin: bytes = b"", timeout: float | None = None
            ) -> CommandResult:
        """Run ``script`` to completion with ``stdin``; output is collected."""
        channel = self.open(script)
        try:
            channel.settimeout(timeout)
            if stdin:
                channel.sendall(stdin)
            channel.shutdown_write()
            stdout = channel.makefile("rb").read()
            stderr = channel.makefile_stderr("rb").read()
            returncode = channel.recv_exit_status()
        except (SSHException, OSError, EOFError) as exc:
            self.close()
            raise RemoteError(f"{self.name}: command failed: "
                              f"{exc or type(exc).__name__}") from None
        finally:
            channel.close()
        if returncode < 0:
            raise RemoteError(f"{self.name}: the connection closed before the command ended")
        return CommandResult(returncode, stdout, stderr)


def _reasons(exc: NoValidConnectionsError) -> str:
    reasons = {str(error) for error in exc.errors.values()}
    return "; ".join(sorted(reasons)) or str(exc)
