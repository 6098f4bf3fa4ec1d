"""The store seam for asyncio (agent, gateway): the functions of
:mod:`circus.common.nix.store`, running the same queries without blocking the loop."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from typing import TypeVar

from circus.common.nix.process import killed_with_parent
from circus.common.nix.store import queries
from circus.common.nix.store.queries import PathInfo, Query

Part = TypeVar("Part")
Answer = TypeVar("Answer")


async def run(query: Query[Part, Answer], env: Mapping[str, str]) -> Answer:
    """Run ``query``'s commands one after the other."""
    parts = []
    for argv in query.argvs:
        process = await asyncio.create_subprocess_exec(
            *killed_with_parent(argv), stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=dict(env))
        out, err = await process.communicate()
        stderr = err.decode(errors="replace")
        if process.returncode != 0:
            raise queries.failed(argv, stderr)
        parts.append(query.parse(stderr if query.reads_stderr else out.decode()))
    return query.combine(parts)


async def build_log(drv_path: str, env: Mapping[str, str]) -> bytes | None:
    """The log Nix kept of the build of ``drv_path`` (None: it kept none)."""
    argv = queries.build_log_argv(drv_path)
    process = await asyncio.create_subprocess_exec(
        *killed_with_parent(argv), stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=dict(env))
    out, err = await process.communicate()
    return queries.kept_log(argv, process.returncode or 0, out, err)


async def invalid_paths(paths: Iterable[str], env: Mapping[str, str]) -> list[str]:
    """The paths of ``paths`` that are not valid in the store (first-seen order)."""
    return await run(queries.invalid_paths(paths), env)


async def requisites(paths: Iterable[str], env: Mapping[str, str], *,
                     include_outputs: bool = False) -> list[str]:
    """The closure of ``paths`` (all valid), dependencies first."""
    return await run(queries.requisites(paths, include_outputs), env)


async def input_closure(drv_path: str, env: Mapping[str, str]) -> list[str]:
    """What building ``drv_path`` needs in a store (see ``store.input_closure``)."""
    return queries.without_own_outputs(
        await requisites([drv_path], env, include_outputs=True), drv_path)


async def derivation_outputs(drv_path: str, env: Mapping[str, str]) -> list[str]:
    return await run(queries.derivation_outputs(drv_path), env)


async def path_infos(paths: Iterable[str], env: Mapping[str, str], *, recursive: bool = False,
                     closure_size: bool = False) -> dict[str, PathInfo]:
    """Facts about the valid paths of ``paths`` (invalid ones are left out); with
    ``recursive``, about their whole closure (then every path must be valid)."""
    return await run(queries.path_infos(paths, recursive=recursive, closure_size=closure_size),
                     env)

