"""Evaluator service functions: the one write path for evaluations.

The API, webhooks, beat and the CLI all call these. (Contract stub: the
evaluator work fills in the bodies; signatures are what callers rely on.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy.orm import Session

from circus.common.enums import TriggerKind
from circus.common.models import Evaluation


@dataclass(frozen=True)
class PullRequest:
    number: int
    head_branch: str
    base_branch: str
    action: str
    head_sha: str | None = None


@dataclass
class Comparison:
    """Jobs that differ between two evaluations (``new`` vs ``old``)."""

    new_jobs: list[str] = field(default_factory=list)
    removed_jobs: list[str] = field(default_factory=list)
    changed_jobs: list[str] = field(default_factory=list)
    unchanged_count: int = 0


def trigger(session: Session, jobset_id: int, kind: TriggerKind, *,
            requested_by: str | None = None, pull_request: PullRequest | None = None,
            ) -> tuple[Evaluation, bool]:
    """Create a pending evaluation and enqueue it after commit.

    Returns ``(evaluation, created)``; when the jobset already has a pending or
    running evaluation, that one is returned with ``created=False``. Raises
    ``NotFound`` for an unknown jobset and ``Conflict`` for a disabled one.
    """
    raise NotImplementedError


def cancel_evaluation(session: Session, evaluation_id: int) -> Evaluation:
    """Cancel a pending/running evaluation (kills its process) and its pending builds."""
    raise NotImplementedError


def compare(session: Session, evaluation_id: int, other_id: int) -> Comparison:
    """Jobs new in ``evaluation_id``, removed since ``other_id``, or with a changed drv."""
    raise NotImplementedError
