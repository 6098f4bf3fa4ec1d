"""Store paths between the runner and a builder: export streams over SSH channels.

``nix-store --export`` (dependencies first) on one side, ``nix-store
--import`` on the other, the stream flowing through a channel of the
builder's connection. Chosen over ``nix-copy-closure``/``nix copy --to
ssh://`` on Debian's Nix 2.8 because those open a second SSH connection with
the OpenSSH client (its own known_hosts and key handling, configured through
``NIX_SSHOPTS``), while this reuses the one connection whose host key Circus
already checked, and costs no handshake per copy. Only what the receiver
lacks travels: the sender asks first (``--check-validity --print-invalid``).
Path lists go through stdin (``$(cat)``), so a large closure never exceeds the
SSH command length.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Mapping, Sequence

from paramiko.channel import Channel
from paramiko.ssh_exception import SSHException

from circus.queue_runner.ssh.connection import Remote, RemoteError

CHUNK = 256 * 1024
#: paths per export stream (an argument list stays far below ARG_MAX)
CHUNK_PATHS = 2000
#: a transfer with no progress for this long is given up (dead connection)
IDLE_TIMEOUT = 300.0


class TransferError(RemoteError):
    pass


class Cancelled(Exception):
    """The step was taken away (cancel, lease lost, shutdown) during a transfer."""


def _paths_input(paths: Sequence[str]) -> bytes:
    return ("\n".join(paths) + "\n").encode() if paths else b""


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


def send(remote: Remote, paths: Sequence[str], env: Mapping[str, str],
         cancelled: Callable[[], bool] = lambda: False) -> None:
    """Copy ``paths`` (dependencies first, each one's references valid there or earlier
    in the list) into the builder's store."""
    for start in range(0, len(paths), CHUNK_PATHS):
        _send_chunk(remote, paths[start:start + CHUNK_PATHS], env, cancelled)


def _send_chunk(remote: Remote, paths: Sequence[str], env: Mapping[str, str],
                cancelled: Callable[[], bool]) -> None:
    export = subprocess.Popen(["nix-store", "--export", *paths], stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(env))
    assert export.stdout is not None and export.stderr is not None
    channel = None
    try:
        channel = remote.open("nix-store --import >/dev/null")
        channel.settimeout(IDLE_TIMEOUT)
        try:
            while chunk := export.stdout.read(CHUNK):
                if cancelled():
                    raise Cancelled()
                channel.sendall(chunk)
            channel.shutdown_write()
        except (SSHException, OSError, EOFError) as exc:
            # the import may have died first: its stderr says why
            raise TransferError(f"sending inputs to {remote.name} failed: "
                                f"{_remote_reason(channel) or exc or type(exc).__name__}"
                                ) from None
        stderr = channel.makefile_stderr("rb").read()
        returncode = channel.recv_exit_status()
    except (SSHException, OSError, EOFError) as exc:
        remote.close()
        raise TransferError(f"sending inputs to {remote.name} failed: "
                            f"{exc or type(exc).__name__}") from None
    finally:
        if channel is not None:
            channel.close()
        if export.poll() is None:
            export.kill()
        export.wait()
    if export.returncode != 0:
        raise TransferError("nix-store --export failed on the runner: "
                            f"{export.stderr.read().decode(errors='replace').strip()[-2000:]}")
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
    importer = subprocess.Popen(["nix-store", "--import"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(env))
    assert importer.stdin is not None
    try:
        channel.settimeout(IDLE_TIMEOUT)
        channel.sendall(_paths_input(paths))
        channel.shutdown_write()
        while chunk := channel.recv(CHUNK):
            if cancelled():
                raise Cancelled()
            importer.stdin.write(chunk)
        stderr = channel.makefile_stderr("rb").read()
        returncode = channel.recv_exit_status()
    except (SSHException, OSError, EOFError) as exc:
        remote.close()
        importer.kill()
        importer.communicate()
        raise TransferError(f"fetching outputs from {remote.name} failed: "
                            f"{exc or type(exc).__name__}") from None
    except BaseException:
        importer.kill()
        importer.communicate()
        raise
    finally:
        channel.close()
    if returncode != 0:
        importer.kill()
        importer.communicate()
        text = stderr.decode(errors="replace").strip()[-2000:] or f"exit status {returncode}"
        raise TransferError(f"nix-store --export on {remote.name} failed: {text}")
    out, err = importer.communicate()
    if importer.returncode != 0:
        raise TransferError("nix-store --import on the runner failed: "
                            f"{err.decode(errors='replace').strip()[-2000:]}")
    return out.decode().split()
