"""Reproducibility checks: rebuild a succeeded derivation with ``nix-store --check``.

A jobset with ``check_reproducibility``, or a job with ``meta.hydra.repeats``
> 0, has its builds checked after they succeed. The step finishes first (its
dependents are released at once), then the worker that built it rebuilds it
with Nix's own ``--check`` (an SSH builder's step on that builder, where its
outputs and inputs still are; agents do not check, see docs/COMPARISON.md); outputs
that differ turn the build into ``non_deterministic`` (the differing output named in
its error message), which notifies like any status change. A matching rebuild
leaves the build as it was.
"""

from __future__ import annotations

import logging
import re
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.orm import Session

from circus.common.enums import BuildStatus
from circus.common.nix.process import killed_with_parent

log = logging.getLogger(__name__)

#: Nix's exit status when ``--check`` found a difference
NOT_DETERMINISTIC_EXIT = 104
_DIFFERS = re.compile(r"output '(/[^']+)' differs")


@dataclass(frozen=True)
class CheckTarget:
    drv_path: str
    outputs: Mapping[str, str]
    build_ids: tuple[int, ...]


def builds_to_check(session: Session, step_ids: list[int]) -> dict[int, list[int]]:
    """Step id → succeeded builds whose top-level step it is and that ask for a check.

    A build asks when its jobset has ``check_reproducibility`` or its job has
    ``meta.hydra.repeats`` > 0 (one ``--check`` rebuild however large the number).
    """
    if not step_ids:
        return {}
    rows = session.execute(text("""
        SELECT bs.step_id, b.id FROM build_steps bs
        JOIN builds b ON b.id = bs.build_id
        JOIN jobsets j ON j.id = b.jobset_id
        WHERE bs.step_id = ANY(:ids) AND bs.is_toplevel AND NOT b.is_aggregate
          AND b.status = :succeeded AND (j.check_reproducibility OR b.repeats > 0)
        ORDER BY bs.step_id, b.id
    """), {"ids": sorted(step_ids), "succeeded": int(BuildStatus.succeeded)}).all()
    found: dict[int, list[int]] = {}
    for step_id, build_id in rows:
        found.setdefault(step_id, []).append(build_id)
    return found


def check_derivation(drv_path: str, outputs: Mapping[str, str], env: Mapping[str, str],
                     timeout: float) -> str | None:
    """Rebuild ``drv_path`` with ``--check``; the mismatch message, or None when it matched.

    Raises ``RuntimeError`` when the check could not be made (the build is left alone).
    """
    try:
        done = subprocess.run(killed_with_parent(check_argv(drv_path)), capture_output=True,
                              text=True, env=dict(env), timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"could not run nix-store --check: {exc}") from exc
    return judge_check(done.returncode, done.stderr, outputs)


def check_argv(drv_path: str, options: Sequence[str] = ()) -> list[str]:
    """The ``--check`` rebuild, here or on an SSH builder (``options``: its ``--option``s)."""
    return ["nix-store", "--realise", "--check", *options, drv_path]


def judge_check(returncode: int, stderr: str, outputs: Mapping[str, str]) -> str | None:
    """The mismatch message of a ``--check`` run, or None when it matched.

    Raises ``RuntimeError`` when Nix failed for another reason (no verdict)."""
    if returncode == 0:
        return None
    differing = _DIFFERS.findall(stderr)
    if returncode != NOT_DETERMINISTIC_EXIT or not differing:
        tail = "\n".join(stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"nix-store --check exited with status {returncode}: {tail}")
    by_path = {path: name for name, path in outputs.items()}
    named = ", ".join(f"{by_path.get(p, '?')} ({p})" for p in differing)
    return f"not reproducible: output {named} differs when rebuilt with nix-store --check"


def mark_non_deterministic(session: Session, build_ids: list[int], message: str) -> list[int]:
    """The one write path of a failed reproducibility check: succeeded → non_deterministic."""
    rows = session.execute(text("""
        UPDATE builds SET status = :status, error_message = :message,
                          notification_pending_since = now()
        WHERE id = ANY(:ids) AND status = :succeeded
        RETURNING id
    """), {"ids": sorted(build_ids), "status": int(BuildStatus.non_deterministic),
           "message": message, "succeeded": int(BuildStatus.succeeded)}).scalars().all()
    return sorted(rows)
