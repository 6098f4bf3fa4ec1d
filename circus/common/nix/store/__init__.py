"""The one seam to the local Nix store: validity, path info, closures, what to build.

Only this package runs ``nix path-info``, ``nix-store --query``,
``nix-store --check-validity``, ``nix-store --read-log`` and
``nix-store --realise --dry-run`` on the
local store (``tests/unit/test_layering.py`` keeps it so). The functions here
block (queue runner, cache); :mod:`circus.common.nix.store.aio` has the same
ones for asyncio (agent, gateway). Both run the queries of
:mod:`~circus.common.nix.store.queries`, which batch many paths into few
processes: starting a Nix process costs more than answering for hundreds of
paths (DESIGN §6). No database imports: the agent uses this package.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TypeVar

from circus.common.nix import process
from circus.common.nix.store import queries
from circus.common.nix.store.queries import (
    Missing,
    PathInfo,
    Query,
    StoreError,
    checked_paths,
    dependency_order,
    parse_dry_run,
    parse_path_info,
)

__all__ = [
    "TIMEOUT",
    "Missing",
    "PathInfo",
    "StoreError",
    "build_log",
    "checked_paths",
    "dependency_order",
    "derivation_outputs",
    "input_closure",
    "invalid_paths",
    "missing",
    "parse_dry_run",
    "parse_path_info",
    "path_infos",
    "requisites",
    "run",
]

#: seconds one Nix command may take before it is killed
TIMEOUT = 600.0

Part = TypeVar("Part")
Answer = TypeVar("Answer")


def run(query: Query[Part, Answer], env: Mapping[str, str], timeout: float = TIMEOUT) -> Answer:
    """Run ``query``'s commands one after the other (each in its own process group)."""
    parts = []
    for argv in query.argvs:
        done = process.run(argv, env=env, timeout=timeout)
        if done.timed_out:
            raise queries.timed_out(argv, timeout)
        if done.returncode != 0:
            raise queries.failed(argv, done.stderr)
        parts.append(query.parse(done.stderr if query.reads_stderr else done.stdout))
    return query.combine(parts)


def invalid_paths(paths: Iterable[str], env: Mapping[str, str], timeout: float = TIMEOUT
                  ) -> list[str]:
    """The paths of ``paths`` that are not valid in the store (first-seen order)."""
    return run(queries.invalid_paths(paths), env, timeout)


def requisites(paths: Iterable[str], env: Mapping[str, str], *, include_outputs: bool = False,
               timeout: float = TIMEOUT) -> list[str]:
    """The closure of ``paths`` (all valid), dependencies first."""
    return run(queries.requisites(paths, include_outputs), env, timeout)


def input_closure(drv_path: str, env: Mapping[str, str], timeout: float = TIMEOUT
                  ) -> list[str]:
    """What building ``drv_path`` needs in a store: its closure with the outputs of its
    inputs, less its own outputs."""
    return queries.without_own_outputs(
        requisites([drv_path], env, include_outputs=True, timeout=timeout), drv_path)


def derivation_outputs(drv_path: str, env: Mapping[str, str], timeout: float = TIMEOUT
                       ) -> list[str]:
    return run(queries.derivation_outputs(drv_path), env, timeout)


def path_infos(paths: Iterable[str], env: Mapping[str, str], *, recursive: bool = False,
               closure_size: bool = False, derivations: bool = False,
               timeout: float = TIMEOUT) -> dict[str, PathInfo]:
    """Facts about the valid paths of ``paths`` (invalid ones are left out); with
    ``recursive``, about their whole closure (then every path must be valid); with
    ``derivations``, ``.drv`` paths are the files themselves, not their outputs."""
    return run(queries.path_infos(paths, recursive=recursive, closure_size=closure_size,
                                  derivations=derivations), env, timeout)


def missing(drv_paths: Iterable[str], env: Mapping[str, str], timeout: float = TIMEOUT
            ) -> Missing:
    """Derivations in the closures of ``drv_paths`` that are neither valid nor
    substitutable (``to_build``), and the paths substituters would provide."""
    return run(queries.missing(drv_paths), env, timeout)


def build_log(drv_path: str, env: Mapping[str, str], timeout: float = TIMEOUT
              ) -> bytes | None:
    """The log Nix kept of the build of ``drv_path`` in this store (``nix-store
    --read-log``, ``keep-build-log``); None when it kept none (the outputs were
    substituted or imported, or never built here)."""
    argv = queries.build_log_argv(drv_path)
    done = process.run_binary(argv, env=env, timeout=timeout)
    if done.timed_out:
        raise queries.timed_out(argv, timeout)
    return queries.kept_log(argv, done.returncode, done.stdout, done.stderr)
