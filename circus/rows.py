"""Two small row operations every service uses: partial updates and unique inserts."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from circus.common.errors import Conflict


def apply_changes(row: Any, changes: dict[str, Any], fields: Iterable[str]) -> dict[str, Any]:
    """Set the allowed fields whose value differs; returns what changed (for audit rows).

    Unchanged values are not assigned, so an idempotent update issues no UPDATE.
    """
    applied: dict[str, Any] = {}
    for field in fields:
        if field in changes and getattr(row, field) != changes[field]:
            setattr(row, field, changes[field])
            applied[field] = changes[field]
    return applied


def apply_managed(row: Any, managed: bool | None) -> dict[str, Any]:
    """Mark ``row`` as the declarative configuration's (``True``) or not; ``None`` leaves
    the mark alone (every caller but the declarative applier). Returns what changed."""
    if managed is None:
        return {}
    return apply_changes(row, {"managed_declaratively": managed}, ("managed_declaratively",))


def insert_unique(session: Session, row: Any, message: str, details: Any = None) -> None:
    """Insert ``row`` in a savepoint; a unique violation (a concurrent twin) is ``Conflict``."""
    try:
        with session.begin_nested():
            session.add(row)
    except IntegrityError as exc:
        raise Conflict(message, details) from exc
