"""Telling an OOM kill from any other ``SIGKILL``.

A builder that died of signal 9 is ``oom_killed`` only when the kernel's OOM
killer acted while it ran: the ``oom_kill`` counter of the build cgroup
(``queue_runner.build_cgroup``: cgroup v2 ``memory.events`` or v1
``memory.oom_control``) grew, or — without a build cgroup — the host-wide
counter in ``/proc/vmstat`` grew. Any other ``SIGKILL`` is a plain failure.
"""

from __future__ import annotations

from pathlib import Path


def _counter(path: Path, key: str = "oom_kill") -> int | None:
    try:
        text = path.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == key and value.strip().isdigit():
            return int(value)
    return None


def cgroup_oom_kills(cgroup_dir: str | Path) -> int | None:
    directory = Path(cgroup_dir)
    for name in ("memory.events", "memory.oom_control"):
        count = _counter(directory / name)
        if count is not None:
            return count
    return None


def host_oom_kills() -> int | None:
    return _counter(Path("/proc/vmstat"))


class OomWatch:
    """Snapshot the counters when a build starts; ask afterwards whether OOM kills happened."""

    def __init__(self, build_cgroup: str | None = None) -> None:
        self.build_cgroup = build_cgroup
        self.start = self._read()

    def _read(self) -> int | None:
        if self.build_cgroup:
            return cgroup_oom_kills(self.build_cgroup)
        return host_oom_kills()

    def occurred(self) -> bool:
        now = self._read()
        return self.start is not None and now is not None and now > self.start
