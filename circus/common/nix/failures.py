"""Why Nix did not build a derivation, and what step status that makes.

One classifier for every builder: local workers and SSH builders read Nix's
per-derivation error messages (``nixrun``), agents the tail of one
``nix-store --realise`` (``realise``); both go through :func:`classify` and
:func:`failure_status`. No database imports: the agent uses this module.
"""

from __future__ import annotations

import re
import signal
from enum import StrEnum

from circus.common.enums import BuildStatus

_EXIT_CODE = re.compile(r"failed with exit code (\d+)")
_SIGNAL = re.compile(r"failed due to signal (\d+)")


class Kind(StrEnum):
    built = "built"
    failed = "failed"
    timeout = "timeout"
    log_limit = "log_limit"
    signal = "signal"
    dependency_failed = "dependency_failed"


def classify(message: str) -> tuple[Kind, int | None, int | None]:
    """Why Nix says a derivation failed: (kind, exit code, signal)."""
    if "dependencies of derivation" in message or "dependencies couldn't be built" in message:
        return Kind.dependency_failed, None, None
    if "timed out after" in message:
        return Kind.timeout, None, None
    if "killed after writing more than" in message:
        return Kind.log_limit, None, None
    match = _SIGNAL.search(message)
    if match:
        return Kind.signal, None, int(match.group(1))
    match = _EXIT_CODE.search(message)
    if match:
        return Kind.failed, int(match.group(1)), None
    return Kind.failed, None, None


def failure_status(kind: Kind, signal_number: int | None, oom_kills: int | None
                   ) -> tuple[BuildStatus, str | None]:
    """The step status of a derivation Nix reported as not built (any kind but ``built``),
    with an error message when the kind alone does not explain it.

    SIGKILL alone proves nothing (a builder may kill itself); the kernel's OOM
    counter moving during the build (``oom_kills``) is what says "out of memory".
    """
    if kind is Kind.timeout:
        return BuildStatus.timeout, None
    if kind is Kind.log_limit:
        return BuildStatus.log_limit_exceeded, None
    if kind is Kind.dependency_failed:
        return BuildStatus.dependency_failed, None
    if kind is Kind.signal and signal_number == signal.SIGKILL and oom_kills:
        return BuildStatus.oom_killed, "the builder was killed by the kernel's OOM killer"
    return BuildStatus.failed, None
