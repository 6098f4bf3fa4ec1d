"""A memory-limited cgroup for OOM tests (v1 memory controller or v2)."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")


def _own(controller: str) -> str | None:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return path
    return None


def _v1_dir(name: str) -> Path | None:
    path = _own("memory")
    base = ROOT / "memory"
    if path is None or not (base / "memory.limit_in_bytes").exists():
        return None
    return base / path.lstrip("/") / name


def _v2_dir(name: str) -> Path | None:
    path = _own("")
    for mount in (ROOT, ROOT / "unified"):
        if path is not None and (mount / "cgroup.controllers").exists() and \
                "memory" in (mount / "cgroup.controllers").read_text():
            return mount / path.lstrip("/") / name
    return None


@contextlib.contextmanager
def memory_cgroup(name: str, limit: int) -> Iterator[Path]:
    """Create a child cgroup with a memory limit (no swap); removed afterwards."""
    v1 = _v1_dir(name)
    if v1 is not None:
        v1.mkdir()
        (v1 / "memory.limit_in_bytes").write_text(str(limit))
        swap = v1 / "memory.memsw.limit_in_bytes"
        if swap.exists():
            with contextlib.suppress(OSError):
                swap.write_text(str(limit))
        directory = v1
    else:
        v2 = _v2_dir(name)
        if v2 is None:
            raise RuntimeError("no writable memory cgroup (v1 or v2) for the OOM test")
        v2.mkdir()
        (v2 / "memory.max").write_text(str(limit))
        with contextlib.suppress(OSError):
            (v2 / "memory.swap.max").write_text("0")
        directory = v2
    try:
        yield directory
    finally:
        for _ in range(50):
            try:
                os.rmdir(directory)
                break
            except OSError:
                time.sleep(0.1)
