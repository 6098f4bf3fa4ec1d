"""``builder_sessions`` rows: one per agent name, updated on connect/heartbeat/disconnect."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from circus.common.enums import AuthKind
from circus.common.models import BuilderSession


@dataclass(frozen=True)
class AgentFacts:
    machine_id: str
    name: str
    hostname: str
    systems: list[str]
    supported_features: list[str]
    mandatory_features: list[str]
    speed_factor: float
    cpu_count: int
    max_jobs: int
    proto_version: int
    ephemeral: bool
    auth_kind: AuthKind = AuthKind.token
    #: the ephemeral pool that launched it (its name starts with "<pool>-")
    pool: str | None = None


def record_connect(session: Session, facts: AgentFacts, connection_id: str,
                   gateway: str) -> int:
    """Upsert the agent's row as connected with a fresh connection id; returns its id."""
    now = datetime.now(UTC)
    values: dict[str, Any] = {
        "machine_id": facts.machine_id, "name": facts.name, "hostname": facts.hostname,
        "systems": facts.systems, "supported_features": facts.supported_features,
        "mandatory_features": facts.mandatory_features, "speed_factor": facts.speed_factor,
        "cpu_count": facts.cpu_count, "max_jobs": facts.max_jobs,
        "proto_version": facts.proto_version, "ephemeral": facts.ephemeral,
        "auth_kind": facts.auth_kind.value, "pool": facts.pool,
        "connection_id": connection_id, "gateway": gateway,
        "connected": True, "connected_at": now, "last_seen": now, "current_jobs": 0,
    }
    statement = insert(BuilderSession).values(values).on_conflict_do_update(
        index_elements=["name"], set_={k: v for k, v in values.items() if k != "name"},
    ).returning(BuilderSession.id)
    return int(session.execute(statement).scalar_one())


def record_heartbeat(session: Session, session_id: int, connection_id: str,
                     beat: dict[str, Any]) -> bool:
    """Store heartbeat facts; False when this connection is no longer the current one."""
    result = session.execute(
        update(BuilderSession)
        .where(BuilderSession.id == session_id, BuilderSession.connection_id == connection_id)
        .values(last_seen=datetime.now(UTC), **beat))
    return bool(result.rowcount)  # type: ignore[attr-defined]


def record_disconnect(session: Session, session_id: int, connection_id: str) -> bool:
    """Mark disconnected — unless a newer connection of the same agent took over.

    A stale disconnect (the old TCP connection timing out after the agent
    already reconnected) must never evict the newer session.
    """
    result = session.execute(
        update(BuilderSession)
        .where(BuilderSession.id == session_id, BuilderSession.connection_id == connection_id)
        .values(connected=False, disconnected_at=datetime.now(UTC), current_jobs=0))
    return bool(result.rowcount)  # type: ignore[attr-defined]


def record_result(session: Session, session_id: int, succeeded: bool) -> None:
    column = BuilderSession.builds_succeeded if succeeded else BuilderSession.builds_failed
    session.execute(update(BuilderSession).where(BuilderSession.id == session_id)
                    .values({column: column + 1}))


def mark_all_disconnected(session: Session, gateway: str) -> None:
    """At gateway start: whatever this gateway held before a crash is gone."""
    session.execute(update(BuilderSession)
                    .where(BuilderSession.gateway == gateway, BuilderSession.connected)
                    .values(connected=False, disconnected_at=datetime.now(UTC), current_jobs=0))


def connected_sessions(session: Session) -> list[BuilderSession]:
    return list(session.scalars(select(BuilderSession).where(BuilderSession.connected)
                                .order_by(BuilderSession.name)))
