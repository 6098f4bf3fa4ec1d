"""Moving store paths between Nix stores (agent ↔ runner, worker ↔ server), asynchronously.

Paths travel as ``nix-store --export`` streams (dependencies first) and are
received with ``nix-store --import``; only the paths the receiver lacks are
sent (the asking is :mod:`circus.common.nix.store.aio`'s). A remote worker
substitutes its inputs from the server's binary cache instead
(:func:`substitute_from`). No database imports: the agent uses this module.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import IO

from circus.common.nix.process import killed_with_parent
from circus.common.nix.store import StoreError, checked_paths

CHUNK = 256 * 1024


async def export_chunks(paths: Sequence[str], env: Mapping[str, str]) -> AsyncIterator[bytes]:
    """``nix-store --export`` of ``paths`` (give them dependencies first), in chunks."""
    argv = ["nix-store", "--export", "--", *checked_paths(paths)]
    process = await asyncio.create_subprocess_exec(
        *killed_with_parent(argv), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL, env=dict(env))
    assert process.stdout is not None and process.stderr is not None
    try:
        while True:
            chunk = await process.stdout.read(CHUNK)
            if not chunk:
                break
            yield chunk
    finally:
        if process.returncode is None:
            await process.wait()
    if process.returncode != 0:
        err = await process.stderr.read()
        raise StoreError(f"nix-store --export failed: {err.decode(errors='replace').strip()}")


async def import_file(source: IO[bytes], env: Mapping[str, str]) -> list[str]:
    """``nix-store --import`` of an export stream already on disk; the imported paths."""
    process = await asyncio.create_subprocess_exec(
        *killed_with_parent(["nix-store", "--import"]), stdin=source,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=dict(env))
    out, err = await process.communicate()
    if process.returncode != 0:
        raise StoreError(f"nix-store --import failed: {err.decode(errors='replace').strip()}")
    return out.decode().split()


async def substitute_from(cache_url: str, paths: Sequence[str], env: Mapping[str, str]
                          ) -> None:
    """Copy ``paths`` (and their closure) from the binary cache at ``cache_url`` into
    this store, as a substituter would: every path must carry a signature by one of
    ``env``'s ``trusted-public-keys``.

    Nix 2.8 reads the arguments as installables: a .drv is copied as the file it is
    only with ``--derivation``, which makes any other path stand for its deriver; so
    the two kinds go in separate calls, other paths first."""
    checked = checked_paths(paths)
    derivations = [p for p in checked if p.endswith(".drv")]
    others = [p for p in checked if not p.endswith(".drv")]
    for flags, group in (([], others), (["--derivation"], derivations)):
        if not group:
            continue
        argv = ["nix", "copy", *flags, "--from", cache_url, "--", *group]
        process = await asyncio.create_subprocess_exec(
            *killed_with_parent(argv), stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env=dict(env))
        _, err = await process.communicate()
        if process.returncode != 0:
            lines = err.decode(errors="replace").strip().splitlines()
            raise StoreError(f"nix copy --from {cache_url} failed: "
                             f"{lines[-1] if lines else process.returncode}")


class Importer:
    """Feeds an export stream into ``nix-store --import``."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = dict(env)
        self.process: asyncio.subprocess.Process | None = None
        self.received = 0

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            *killed_with_parent(["nix-store", "--import"]), stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=self.env)

    async def write(self, chunk: bytes) -> None:
        if self.process is None:
            await self.start()
        assert self.process is not None and self.process.stdin is not None
        self.received += len(chunk)
        self.process.stdin.write(chunk)
        await self.process.stdin.drain()

    async def close(self) -> list[str]:
        """Finish the import; returns the imported paths."""
        if self.process is None:
            return []
        assert self.process.stdin is not None
        self.process.stdin.close()
        out, err = await self.process.communicate()
        if self.process.returncode != 0:
            raise StoreError(f"nix-store --import failed: {err.decode(errors='replace').strip()}")
        return out.decode().split()

    async def abort(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()


def import_file_sync(source: IO[bytes], env: Mapping[str, str], timeout: float = 3600
                     ) -> list[str]:
    """:func:`import_file` for threads without an event loop (the server's requests,
    the remote worker)."""
    try:
        done = subprocess.run(killed_with_parent(["nix-store", "--import"]),
                              stdin=source, capture_output=True,
                              env=dict(env), timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise StoreError(f"nix-store --import took longer than {timeout:.0f}s") from None
    if done.returncode != 0:
        raise StoreError(f"nix-store --import failed: "
                         f"{done.stderr.decode(errors='replace').strip()}")
    return done.stdout.decode().split()


def export_to_file(paths: Sequence[str], sink: IO[bytes], env: Mapping[str, str],
                   timeout: float = 3600) -> None:
    """``nix-store --export`` of ``paths`` (dependencies first) into ``sink``."""
    argv = ["nix-store", "--export", "--", *checked_paths(paths)]
    try:
        done = subprocess.run(killed_with_parent(argv), stdout=sink, stderr=subprocess.PIPE,
                              stdin=subprocess.DEVNULL, env=dict(env), timeout=timeout,
                              check=False)
    except subprocess.TimeoutExpired:
        raise StoreError(f"nix-store --export took longer than {timeout:.0f}s") from None
    if done.returncode != 0:
        raise StoreError(f"nix-store --export failed: "
                         f"{done.stderr.decode(errors='replace').strip()}")
