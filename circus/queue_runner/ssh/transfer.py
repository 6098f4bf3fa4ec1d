"""Store paths between the runner and a builder: export streams over SSH channels.

``nix-store --export`` (dependencies first) on one side, ``nix-store
--import`` on the other, the stream flowing through a channel of the
builder's connection. Chosen over ``nix-copy-closure``/``nix copy --to
ssh://`` on Debian's Nix 2.8 because those open a second SSH connection with
the OpenSSH client (its own known_hosts and key handling, configured through
``NIX_SSHOPTS``), while this reuses the one connection whose host key Circus
already checked, and costs no handshake per copy. Only what the receiver
lacks travels: the sender asks first (``--check-validity --print-invalid``)
unless what it would send is a few small files (``.drv`` files, small
sources), where asking costs more than sending — importing a path the store
already has is a no-op. Path lists go through stdin (``$(cat)``), so a large
closure never exceeds the SSH command length.

In the common case a step needs no command of its own for transfers: its
inputs stream into the build command's stdin (``remotebuild``) and its outputs
come back on its stdout; the commands here are for what does not fit there.

The ``remote_*`` queries run on the builder and ask *its* store; the runner's
own store is asked through :mod:`circus.common.nix.store` only.
"""

from __future__ import annotations

import os
import stat
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence

from paramiko.channel import Channel
from paramiko.ssh_exception import SSHException

from circus.common.nix.process import killed_with_parent
from circus.queue_runner.ssh.connection import Remote, RemoteError

CHUNK = 256 * 1024
#: paths per export stream (an argument list stays far below ARG_MAX)
CHUNK_PATHS = 2000
#: unknown inputs of at most this many bytes, all regular files, are sent unasked
BLIND_SEND_BYTES = 256 * 1024
#: a transfer with no progress for this long is given up (dead connection)
IDLE_TIMEOUT = 300.0


class TransferError(RemoteError):
    pass


class Cancelled(Exception):
    """The step was taken away (cancel, lease lost, shutdown) during a transfer."""


def _paths_input(paths: Sequence[str]) -> bytes:
    return ("\n".join(paths) + "\n").encode() if paths else b""


def small_files(paths: Sequence[str], limit: int = BLIND_SEND_BYTES) -> bool:
    """Are ``paths`` regular files of at most ``limit`` bytes together (cheaper to send
    than to ask about)?"""
    total = 0
    for path in paths:
        try:
            info = os.lstat(path)
        except OSError:
            return False
        if not stat.S_ISREG(info.st_mode):
            return False
        total += info.st_size
        if total > limit:
            return False
    return True


def remote_invalid(remote: Remote, paths: Sequence[str]) -> list[str]:
    """The subset of ``paths`` the builder's store lacks (order kept)."""
    if not paths:
        return []
    result = remote.run("nix-store --check-validity --print-invalid $(cat)",
                        _paths_input(paths), timeout=IDLE_TIMEOUT)
    if result.returncode != 0:
        raise TransferError(f"nix-store --check-validity on {remote.name} failed: "
                            f"{result.error_text()}")
    invalid = set(result.stdout.decode().split())
    return [p for p in paths if p in invalid]


def remote_closure(remote: Remote, paths: Sequence[str]) -> list[str]:
    """The closure of ``paths`` in the builder's store, dependencies first."""
    result = remote.run("nix-store --query --requisites $(cat)", _paths_input(paths),
                        timeout=IDLE_TIMEOUT)
    if result.returncode != 0:
        raise TransferError(f"nix-store --query on {remote.name} failed: "
                            f"{result.error_text()}")
    return result.stdout.decode().split()


def stream_export(channel: Channel, paths: Sequence[str], env: Mapping[str, str],
                  cancelled: Callable[[], bool] = lambda: False) -> None:
    """Write ``nix-store --export <paths>`` into ``channel`` (stdin stays open)."""
    export = subprocess.Popen(killed_with_parent(["nix-store", "--export", "--", *paths]),
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=dict(env))
    assert export.stdout is not None and export.stderr is not None
    try:
        while chunk := export.stdout.read(CHUNK):
            if cancelled():
                raise Cancelled()
            channel.sendall(chunk)
    except (SSHException, OSError, EOFError) as exc:
        raise TransferError(f"sending inputs failed: {exc or type(exc).__name__}") from None
    finally:
        if export.poll() is None:
            export.kill()
        export.wait()
    if export.returncode != 0:
        raise TransferError("nix-store --export failed on the runner: "
                            f"{export.stderr.read().decode(errors='replace').strip()[-2000:]}")


def send(remote: Remote, paths: Sequence[str], env: Mapping[str, str],
         cancelled: Callable[[], bool] = lambda: False) -> None:
    """Copy ``paths`` (dependencies first, each one's references valid there or earlier
    in the list) into the builder's store, one import command per chunk."""
    for start in range(0, len(paths), CHUNK_PATHS):
        _send_chunk(remote, paths[start:start + CHUNK_PATHS], env, cancelled)


def _send_chunk(remote: Remote, paths: Sequence[str], env: Mapping[str, str],
                cancelled: Callable[[], bool]) -> None:
    channel = remote.open("nix-store --import >/dev/null")
    try:
        channel.settimeout(IDLE_TIMEOUT)
        try:
            stream_export(channel, paths, env, cancelled)
            channel.shutdown_write()
        except TransferError as exc:
            # the import may have died first: its stderr says why
            reason = _remote_reason(channel)
            raise TransferError(f"sending inputs to {remote.name} failed: "
                                f"{reason or exc}") from None
        stderr = channel.makefile_stderr("rb").read()
        returncode = channel.recv_exit_status()
    except (SSHException, OSError, EOFError) as exc:
        remote.close()
        raise TransferError(f"sending inputs to {remote.name} failed: "
                            f"{exc or type(exc).__name__}") from None
    finally:
        channel.close()
    if returncode != 0:
        text = stderr.decode(errors="replace").strip()[-2000:] or f"exit status {returncode}"
        raise TransferError(f"nix-store --import on {remote.name} failed: {text}")


def _remote_reason(channel: Channel) -> str:
    """What a command that stopped reading wrote to stderr (best effort, brief wait)."""
    try:
        channel.settimeout(5.0)
        channel.status_event.wait(5.0)
        data: bytes = channel.makefile_stderr("rb").read()
    except (SSHException, OSError, EOFError):
        return ""
    return data.decode(errors="replace").strip()[-2000:]


class LocalImport:
    """Feeds bytes into the runner's ``nix-store --import`` (started at the first byte)."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = dict(env)
        self.process: subprocess.Popen[bytes] | None = None
        self.error: str | None = None
        self.imported: list[str] = []
        self.received = 0

    def write(self, chunk: bytes) -> None:
        if self.error is not None:
            return
        if self.process is None:
            self.process = subprocess.Popen(
                killed_with_parent(["nix-store", "--import"]), stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=self.env)
        assert self.process.stdin is not None
        self.received += len(chunk)
        try:
            self.process.stdin.write(chunk)
        except OSError as exc:  # the import died: close() says why
            self.error = str(exc)

    def close(self, complete: bool = True) -> None:
        """Finish (``complete``: the stream ended normally; else abort the import)."""
        if self.process is None:
            return
        if not complete:
            self.process.kill()
        try:
            # closes stdin: the import sees the end of the stream
            out, err = self.process.communicate()
        except (OSError, ValueError):
            self.process.kill()
            out, err = self.process.communicate()
        if self.process.returncode != 0:
            self.error = ("nix-store --import on the runner failed: "
                          f"{err.decode(errors='replace').strip()[-2000:]}")
        elif not complete:
            self.error = "the output stream was cut off"
        self.imported = out.decode().split()


def pump(channel: Channel, sink: LocalImport,
         on_data: Callable[[], None] = lambda: None) -> threading.Thread:
    """Copy the channel's stdout into ``sink`` in a thread (until EOF)."""

    def run() -> None:
        complete = True
        try:
            while chunk := channel.recv(CHUNK):
                on_data()
                sink.write(chunk)
        except (SSHException, OSError, EOFError):
            complete = False
        try:
            # EOF: the export ended (a cut-off stream makes the import fail by itself)
            sink.close(complete)
        except Exception as exc:  # the caller falls back to fetching; never lose the thread
            sink.error = f"importing the outputs failed: {exc}"

    thread = threading.Thread(target=run, name="ssh-output-import", daemon=True)
    thread.start()
    return thread


def fetch(remote: Remote, paths: Sequence[str], env: Mapping[str, str],
          cancelled: Callable[[], bool] = lambda: False) -> list[str]:
    """Copy ``paths`` (dependencies first) from the builder into the runner's store;
    returns the paths ``nix-store --import`` reported."""
    imported: list[str] = []
    for start in range(0, len(paths), CHUNK_PATHS):
        imported += _fetch_chunk(remote, paths[start:start + CHUNK_PATHS], env, cancelled)
    return imported


def _fetch_chunk(remote: Remote, paths: Sequence[str], env: Mapping[str, str],
                 cancelled: Callable[[], bool]) -> list[str]:
    channel = remote.open("nix-store --export $(cat)")
    sink = LocalImport(env)
    complete = False
    try:
        channel.settimeout(IDLE_TIMEOUT)
        channel.sendall(_paths_input(paths))
        channel.shutdown_write()
        while chunk := channel.recv(CHUNK):
            if cancelled():
                raise Cancelled()
            sink.write(chunk)
        stderr = channel.makefile_stderr("rb").read()
        returncode = channel.recv_exit_status()
        complete = returncode == 0
    except (SSHException, OSError, EOFError) as exc:
        remote.close()
        raise TransferError(f"fetching outputs from {remote.name} failed: "
                            f"{exc or type(exc).__name__}") from None
    finally:
        channel.close()
        sink.close(complete)
    if returncode != 0:
        text = stderr.decode(errors="replace").strip()[-2000:] or f"exit status {returncode}"
        raise TransferError(f"nix-store --export on {remote.name} failed: {text}")
    if sink.error:
        raise TransferError(sink.error)
    return sink.imported
