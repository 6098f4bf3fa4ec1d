"""Operational records: notifications, audit log, news, daemon heartbeats, counters."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, Index, text
from sqlalchemy.orm import Mapped, mapped_column

from circus.common.enums import ActorKind, NotificationTaskStatus, NotificationType
from circus.common.models.base import Base, CreatedAt, IntPK, JsonDict, enum_column


class NotificationTask(Base):
    __tablename__ = "notification_tasks"

    id: Mapped[IntPK]
    type: Mapped[NotificationType] = mapped_column(
        enum_column(NotificationType, "notification_type"))
    payload: Mapped[JsonDict]
    status: Mapped[NotificationTaskStatus] = mapped_column(
        enum_column(NotificationTaskStatus, "notification_task_status"),
        default=NotificationTaskStatus.pending,
        server_default=NotificationTaskStatus.pending.value)
    attempts: Mapped[int] = mapped_column(server_default="0", default=0)
    max_attempts: Mapped[int] = mapped_column(server_default="5", default=5)
    next_retry_at: Mapped[datetime | None]
    last_error: Mapped[str | None]
    build_id: Mapped[int | None] = mapped_column(ForeignKey("builds.id", ondelete="SET NULL"),
                                                 index=True)
    config_id: Mapped[int | None] = mapped_column(
        ForeignKey("notification_configs.id", ondelete="SET NULL"))
    created_at: Mapped[CreatedAt]
    completed_at: Mapped[datetime | None]

    __table_args__ = (
        Index("ix_notification_tasks_due", "next_retry_at",
              postgresql_where=text("status = 'pending'")),
        Index("ix_notification_tasks_status", "status"),
    )


class AuditLog(Base):
    __tablename__ = "audit_log"

    id: Mapped[IntPK]
    at: Mapped[CreatedAt]
    actor_kind: Mapped[ActorKind] = mapped_column(enum_column(ActorKind, "actor_kind"))
    actor: Mapped[str | None]
    action: Mapped[str]
    target: Mapped[str | None]
    details: Mapped[JsonDict]
    remote_addr: Mapped[str | None]

    __table_args__ = (
        Index("ix_audit_log_at", text("at DESC")),
        Index("ix_audit_log_action", "action"),
    )


class News(Base):
    __tablename__ = "news"

    id: Mapped[IntPK]
    title: Mapped[str] = mapped_column(server_default="", default="")
    contents: Mapped[str]
    author_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    created_at: Mapped[CreatedAt]


class ServiceHeartbeat(Base):
    __tablename__ = "service_heartbeats"

    #: ``<kind>@<hostname>`` (e.g. ``queue-runner@build1``)
    service: Mapped[str] = mapped_column(primary_key=True)
    kind: Mapped[str]
    hostname: Mapped[str]
    pid: Mapped[int | None]
    version: Mapped[str]
    started_at: Mapped[datetime]
    last_heartbeat: Mapped[datetime]
    details: Mapped[JsonDict]


class ServiceCounter(Base):
    """A monotonic count that server processes add to (cache hits, bytes served).

    Each process keeps its own increments in memory and adds them here every few
    seconds (``circus.server.counters``), so ``/metrics`` of any process reports the
    total of all of them.
    """

    __tablename__ = "service_counters"

    #: e.g. ``cache_requests:narinfo:hit``
    name: Mapped[str] = mapped_column(primary_key=True)
    value: Mapped[int] = mapped_column(server_default="0", default=0)

