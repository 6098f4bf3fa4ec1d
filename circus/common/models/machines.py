"""Build machines: SSH builders and agent sessions."""

from __future__ import annotations

from datetime import datetime
from typing import Any, cast

from sqlalchemy import Float, Index, column, func, select, table, text
from sqlalchemy.orm import Mapped, column_property, mapped_column

from circus.common.enums import AuthKind
from circus.common.models.base import (
    Base,
    BoolFalse,
    BoolTrue,
    CreatedAt,
    IntPK,
    TextList,
    enum_column,
)

#: the columns of ``steps`` the running-jobs count needs (no import cycle with steps.py)
_steps = table("steps", column("state"), column("worker"), column("machine"))


class RemoteBuilder(Base):
    __tablename__ = "remote_builders"

    id: Mapped[IntPK]
    name: Mapped[str] = mapped_column(unique=True)
    ssh_uri: Mapped[str]
    systems: Mapped[TextList]
    max_jobs: Mapped[int] = mapped_column(server_default="1", default=1)
    speed_factor: Mapped[float] = mapped_column(Float, server_default="1", default=1.0)
    supported_features: Mapped[TextList]
    mandatory_features: Mapped[TextList]
    ssh_key_file: Mapped[str | None]
    public_host_key: Mapped[str | None]
    enabled: Mapped[BoolTrue]
    consecutive_failures: Mapped[int] = mapped_column(server_default="0", default=0)
    disabled_until: Mapped[datetime | None]
    last_failure: Mapped[str | None]
    managed_declaratively: Mapped[BoolFalse]
    created_at: Mapped[CreatedAt]
    #: steps running on it now, by any queue runner (read-only, computed)
    current_jobs: Mapped[int] = column_property(
        select(func.count()).select_from(_steps)
        .where(_steps.c.state == "running", _steps.c.worker.like("ssh:%"),
               _steps.c.machine == cast(Any, name).column)
        .correlate_except(_steps).scalar_subquery())


class BuilderSession(Base):
    """A connection of a ``circus-agent`` to the gateway (kept after disconnect)."""

    __tablename__ = "builder_sessions"

    id: Mapped[IntPK]
    machine_id: Mapped[str]
    name: Mapped[str] = mapped_column(unique=True)
    hostname: Mapped[str]
    systems: Mapped[TextList]
    supported_features: Mapped[TextList]
    mandatory_features: Mapped[TextList]
    speed_factor: Mapped[float] = mapped_column(Float, server_default="1", default=1.0)
    cpu_count: Mapped[int] = mapped_column(server_default="1", default=1)
    max_jobs: Mapped[int] = mapped_column(server_default="1", default=1)
    proto_version: Mapped[int]
    ephemeral: Mapped[BoolFalse]
    auth_kind: Mapped[AuthKind] = mapped_column(enum_column(AuthKind, "auth_kind"),
                                                default=AuthKind.token)
    #: ephemeral pool the agent belongs to, and the repository its OIDC token named
    pool: Mapped[str | None]
    oidc_repository: Mapped[str | None]
    #: random id of the current connection: a stale disconnect carries an older one
    connection_id: Mapped[str | None]
    gateway: Mapped[str | None]
    connected: Mapped[BoolFalse]
    connected_at: Mapped[datetime | None]
    disconnected_at: Mapped[datetime | None]
    last_seen: Mapped[datetime | None]
    current_jobs: Mapped[int] = mapped_column(server_default="0", default=0)
    load1: Mapped[float | None] = mapped_column(Float)
    load5: Mapped[float | None] = mapped_column(Float)
    load15: Mapped[float | None] = mapped_column(Float)
    mem_total: Mapped[int | None]
    mem_used: Mapped[int | None]
    store_free: Mapped[int | None]
    build_dir_free: Mapped[int | None]
    cpu_psi_avg10: Mapped[float | None] = mapped_column(Float)
    mem_psi_avg10: Mapped[float | None] = mapped_column(Float)
    io_psi_avg10: Mapped[float | None] = mapped_column(Float)
    cpu_psi_avg60: Mapped[float | None] = mapped_column(Float)
    mem_psi_avg60: Mapped[float | None] = mapped_column(Float)
    io_psi_avg60: Mapped[float | None] = mapped_column(Float)
    builds_succeeded: Mapped[int] = mapped_column(server_default="0", default=0)
    builds_failed: Mapped[int] = mapped_column(server_default="0", default=0)
    consecutive_failures: Mapped[int] = mapped_column(server_default="0", default=0)
    disabled_until: Mapped[datetime | None]
    created_at: Mapped[CreatedAt]

    __table_args__ = (
        Index("ix_builder_sessions_machine_id", "machine_id"),
        Index("ix_builder_sessions_connected", "connected", postgresql_where=text("connected")),
    )
