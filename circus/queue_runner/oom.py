"""Telling an OOM kill from any other ``SIGKILL``.

A builder that died of signal 9 is ``oom_killed`` only when the kernel's OOM
killer acted while it ran: the ``oom_kill`` counter of the build cgroup
(``queue_runner.build_cgroup``: cgroup v2 ``memory.events`` or v1
``memory.oom_control``) grew, or — without a build cgroup — the host-wide
counter in ``/proc/vmstat`` grew — between the start and the end of that very
build (builds of one batch run one at a time). Any other ``SIGKILL`` is a plain
failure. Two batches sharing a cgroup can still confuse an OOM kill in one
with an unrelated ``SIGKILL`` in the other at the same moment; that is rare
enough to accept.
"""

from __future__ import annotations

from collections.abc import Callable
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


def oom_counter(build_cgroup: str | None) -> Callable[[], int | None]:
    """The counter to watch: the build cgroup's, else the host's."""
    if build_cgroup:
        return lambda: cgroup_oom_kills(build_cgroup)
    return host_oom_kills
