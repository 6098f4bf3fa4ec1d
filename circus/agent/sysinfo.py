"""Heartbeat facts about this host: load, memory, free space, pressure (PSI)."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Pressure:
    avg10: float = 0.0
    avg60: float = 0.0


@dataclass
class HostStatus:
    load1: float
    load5: float
    load15: float
    mem_total: int
    mem_used: int
    store_free: int
    build_dir_free: int
    cpu: Pressure = field(default_factory=Pressure)
    mem: Pressure = field(default_factory=Pressure)
    io: Pressure = field(default_factory=Pressure)
    has_pressure: bool = False


def read_pressure(resource: str, root: Path = Path("/proc/pressure")) -> Pressure | None:
    """The ``some`` line of /proc/pressure/<resource>, or None when PSI is unavailable."""
    try:
        text = (root / resource).read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("some"):
            values = dict(part.split("=", 1) for part in line.split()[1:] if "=" in part)
            try:
                return Pressure(float(values.get("avg10", 0)), float(values.get("avg60", 0)))
            except ValueError:
                return None
    return None


def read_memory(meminfo: Path = Path("/proc/meminfo")) -> tuple[int, int]:
    values: dict[str, int] = {}
    try:
        for line in meminfo.read_text().splitlines():
            key, _, rest = line.partition(":")
            values[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return 0, 0
    total = values.get("MemTotal", 0)
    available = values.get("MemAvailable", values.get("MemFree", 0))
    return total, max(0, total - available)


def free_bytes(path: str) -> int:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 0


def host_status(store_dir: str = "/nix/store", build_dir: str | None = None) -> HostStatus:
    import tempfile

    load1, load5, load15 = os.getloadavg()
    total, used = read_memory()
    status = HostStatus(load1, load5, load15, total, used, free_bytes(store_dir),
                        free_bytes(build_dir or tempfile.gettempdir()))
    pressures = {name: read_pressure(name) for name in ("cpu", "memory", "io")}
    if all(p is not None for p in pressures.values()):
        status.cpu = pressures["cpu"] or Pressure()
        status.mem = pressures["memory"] or Pressure()
        status.io = pressures["io"] or Pressure()
        status.has_pressure = True
    return status
