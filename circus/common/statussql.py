"""Build and step statuses as SQL literals, rendered from ``BuildStatus``.

Raw SQL never spells a bare status number: it interpolates these names, so a
reader sees ``status IN {UNFINISHED}`` and the numbers live in one place.
"""

from __future__ import annotations

from circus.common.enums import BuildStatus


def literal(status: BuildStatus) -> str:
    return str(int(status))


def one_of(*statuses: BuildStatus) -> str:
    return "(" + ", ".join(literal(status) for status in statuses) + ")"


PENDING = literal(BuildStatus.pending)
RUNNING = literal(BuildStatus.running)
SUCCEEDED = literal(BuildStatus.succeeded)
FAILED = literal(BuildStatus.failed)
#: a build still to be decided (queued or building)
UNFINISHED = one_of(BuildStatus.pending, BuildStatus.running)
#: finished builds whose outputs exist (worth a GC root)
WITH_OUTPUTS = one_of(BuildStatus.succeeded, BuildStatus.failed_with_output)
