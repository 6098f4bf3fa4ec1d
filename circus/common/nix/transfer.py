"""Moving store paths between Nix stores (agent ↔ runner), asynchronously.

Paths travel as ``nix-store --export`` streams (dependencies first) and are
received with ``nix-store --import``; only the paths the receiver lacks are
sent. No database imports: the agent uses this module.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO

from circus.common.nix import storepath

CHUNK = 256 * 1024


class StoreError(RuntimeError):
    pass


def checked_paths(paths: Iterable[str]) -> list[str]:
    """``paths`` as a list, each one checked to be a store path.

    Every path handed to a Nix command goes through here and then after ``--``:
    paths come from the other side of the agent protocol, and ``--option …`` or
    ``/etc/passwd`` must never reach an argument list.
    """
    found = list(paths)
    for path in found:
        if not storepath.is_store_path(path):
            raise StoreError(f"refused: {path[:200]!r} is not a store path")
    return found


async def _run(argv: Sequence[str], env: Mapping[str, str], stdin: bytes | None = None
               ) -> str:
    process = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=dict(env))
    out, err = await process.communicate(stdin)
    if process.returncode != 0:
        raise StoreError(f"{' '.join(argv[:2])} failed: {err.decode(errors='replace').strip()}")
    return out.decode()


async def invalid_paths(paths: Sequence[str], env: Mapping[str, str]) -> list[str]:
    """The subset of ``paths`` that is not valid in this store (order kept)."""
    if not paths:
        return []
    out = await _run(["nix-store", "--check-validity", "--print-invalid", "--",
                      *checked_paths(paths)], env)
    invalid = set(out.split())
    return [p for p in paths if p in invalid]


async def closure(paths: Sequence[str], env: Mapping[str, str],
                  include_outputs: bool = False) -> list[str]:
    """Requisites of ``paths`` in dependency order (dependencies first)."""
    if not paths:
        return []
    argv = ["nix-store", "--query", "--requisites"]
    if include_outputs:
        argv.append("--include-outputs")
    return (await _run([*argv, "--", *checked_paths(paths)], env)).split()


async def derivation_outputs(drv_path: str, env: Mapping[str, str]) -> list[str]:
    return (await _run(["nix-store", "--query", "--outputs", "--",
                        *checked_paths([drv_path])], env)).split()


@dataclass(frozen=True)
class PathInfo:
    path: str
    nar_hash: str
    nar_size: int
    closure_size: int
    references: list[str]
    deriver: str | None


async def path_infos(paths: Sequence[str], env: Mapping[str, str], recursive: bool = False
                     ) -> dict[str, PathInfo]:
    """Facts about ``paths`` (and, ``recursive``, their whole closure)."""
    if not paths:
        return {}
    argv = ["nix", "path-info", "--json", "--closure-size"]
    if recursive:
        argv.append("--recursive")
    out = await _run([*argv, "--", *checked_paths(paths)], env)
    infos: dict[str, PathInfo] = {}
    data = json.loads(out)
    # Nix 2.8 prints a list of objects; newer versions an object keyed by path
    items = data.items() if isinstance(data, dict) else ((d["path"], d) for d in data)
    for path, info in items:
        infos[path] = PathInfo(path, info["narHash"], int(info["narSize"]),
                               int(info.get("closureSize", 0)), list(info.get("references", [])),
                               info.get("deriver"))
    return infos


def dependency_order(infos: Mapping[str, PathInfo]) -> list[str]:
    """The paths of ``infos`` with every path after its references (import order)."""
    ordered: list[str] = []
    seen: set[str] = set()

    def visit(path: str) -> None:
        stack = [(path, iter(sorted(infos[path].references)))]
        seen.add(path)
        while stack:
            current, refs = stack[-1]
            for ref in refs:
                if ref in infos and ref not in seen and ref != current:
                    seen.add(ref)
                    stack.append((ref, iter(sorted(infos[ref].references))))
                    break
            else:
                stack.pop()
                ordered.append(current)

    for path in sorted(infos):
        if path not in seen:
            visit(path)
    return ordered


async def export_chunks(paths: Sequence[str], env: Mapping[str, str]) -> AsyncIterator[bytes]:
    """``nix-store --export`` of ``paths`` (give them dependencies first), in chunks."""
    argv = ["nix-store", "--export", "--", *checked_paths(paths)]
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE,
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
        "nix-store", "--import", stdin=source, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=dict(env))
    out, err = await process.communicate()
    if process.returncode != 0:
        raise StoreError(f"nix-store --import failed: {err.decode(errors='replace').strip()}")
    return out.decode().split()


class Importer:
    """Feeds an export stream into ``nix-store --import``."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = dict(env)
        self.process: asyncio.subprocess.Process | None = None
        self.received = 0

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            "nix-store", "--import", stdin=asyncio.subprocess.PIPE,
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
