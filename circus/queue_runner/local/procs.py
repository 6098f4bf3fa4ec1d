"""Killing builds completely.

Nix puts every builder into its own session (``setsid``), so killing the
``nix-store`` process group leaves the builder running. These helpers walk
``/proc`` to find the whole tree and kill every process group in it, and find
builders of a derivation by their ``out=`` environment entry (left behind when
a worker died with ``kill -9``).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping

PROC = "/proc"


def _stat(pid: int) -> tuple[int, int] | None:
    """(ppid, pgid) of a process, None when it is gone."""
    try:
        with open(f"{PROC}/{pid}/stat", "rb") as handle:
            data = handle.read()
    except OSError:
        return None
    # the command name may contain spaces and parentheses: fields start after the last ')'
    fields = data[data.rfind(b")") + 2:].split()
    try:
        return int(fields[1]), int(fields[2])
    except (IndexError, ValueError):
        return None


def _pids() -> list[int]:
    try:
        return [int(name) for name in os.listdir(PROC) if name.isdigit()]
    except OSError:
        return []


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid in _pids():
        stat = _stat(pid)
        if stat is not None:
            children.setdefault(stat[0], []).append(pid)
    found: list[int] = []
    stack = [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def kill_tree(root: int, sig: int = signal.SIGKILL) -> None:
    """Kill ``root``, its descendants and every process group among them."""
    pids = [root, *descendants(root)]
    own_group = os.getpgrp()
    groups = set()
    for pid in pids:
        stat = _stat(pid)
        if stat is not None and stat[1] not in (own_group, 0, 1):
            groups.add(stat[1])
    for group in groups:
        try:
            os.killpg(group, sig)
        except (ProcessLookupError, PermissionError):
            pass
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def builders_of(outputs: Mapping[str, str], within: int | None = None) -> list[int]:
    """Processes whose environment says they build these outputs (``{name: path}``).

    Nix gives a builder one ``<output name>=<path>`` variable per output; its
    children inherit them. (A dependent's builder mentions the path under another
    variable name, so matching name and path together never hits it.) With
    ``within``, only descendants of that process are considered.
    """
    needles = {f"{name}={path}".encode() for name, path in outputs.items()}
    if not needles:
        return []
    candidates = descendants(within) if within is not None else _pids()
    me = os.getpid()
    return [pid for pid in candidates if pid != me and _environ_has(pid, needles)]


def _environ_has(pid: int, needles: set[bytes]) -> bool:
    try:
        with open(f"{PROC}/{pid}/environ", "rb") as handle:
            entries = handle.read().split(b"\0")
    except OSError:
        return False
    return any(entry in needles for entry in entries)


def kill_builders_of(outputs: Mapping[str, str], within: int | None = None) -> int:
    """Kill the builders of these outputs with their whole groups; returns how many."""
    pids = builders_of(outputs, within)
    for pid in pids:
        kill_tree(pid)
    return len(pids)
