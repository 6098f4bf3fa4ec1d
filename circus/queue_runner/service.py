"""Queue-runner service functions: user actions on builds.

The API, dashboard and CLI call these. (Contract stub: the queue-runner work
fills in the bodies; signatures are what callers rely on.)
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from circus.common.models import Build


def cancel_build(session: Session, build_id: int, *, reason: str | None = None) -> Build:
    """Cancel a pending or running build (a running step's process group is killed).

    Raises ``NotFound``; ``Conflict`` when the build already finished.
    """
    raise NotImplementedError


def restart_build(session: Session, build_id: int) -> Build:
    """Put a finished build back to pending, clear its failed paths, and restart the
    dependents that ended ``dependency_failed`` because of it. ``Conflict`` if unfinished."""
    raise NotImplementedError


def bump_build(session: Session, build_id: int) -> Build:
    """Raise the build's priority above every queued build (and its steps')."""
    raise NotImplementedError


def set_keep(session: Session, build_id: int, keep: bool) -> Build:
    """Pin (or unpin) the build's outputs with a GC root."""
    raise NotImplementedError
