"""The audit log: one row for every mutation, written by the service that makes it."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from circus.auth.actor import Actor
from circus.common.models import AuditLog


def record(session: Session, actor: Actor, action: str, target: str | None = None,
           details: dict[str, Any] | None = None) -> AuditLog:
    """Add an audit row in the caller's transaction (so it exists iff the change does)."""
    row = AuditLog(actor_kind=actor.kind, actor=actor.name, action=action, target=target,
                   details=_jsonable(details or {}), remote_addr=actor.remote_addr)
    session.add(row)
    return row


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)
