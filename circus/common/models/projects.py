"""Projects and what hangs off them: jobsets, inputs, channels, members, hooks."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import CheckConstraint, ForeignKey, Index, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from circus.common.enums import (
    ChannelMode,
    ForgeType,
    InputType,
    JobsetState,
    MemberRole,
    NotificationType,
    TriggerMode,
)
from circus.common.models.base import (
    Base,
    BoolFalse,
    BoolTrue,
    CreatedAt,
    IntPK,
    JsonDict,
    UpdatedAt,
    enum_column,
)

if TYPE_CHECKING:
    from circus.common.models.evaluations import Evaluation
    from circus.common.models.users import User


class Project(Base):
    __tablename__ = "projects"

    id: Mapped[IntPK]
    name: Mapped[str] = mapped_column(unique=True)
    description: Mapped[str] = mapped_column(server_default="", default="")
    repository_url: Mapped[str] = mapped_column(server_default="", default="")
    enabled: Mapped[BoolTrue]
    hidden: Mapped[BoolFalse]
    owner_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    cache_enabled: Mapped[BoolTrue]
    managed_declaratively: Mapped[BoolFalse]
    created_at: Mapped[CreatedAt]
    updated_at: Mapped[UpdatedAt]

    jobsets: Mapped[list[Jobset]] = relationship(
        back_populates="project", cascade="all, delete-orphan", passive_deletes=True,
        order_by="Jobset.name",
    )
    owner: Mapped[User | None] = relationship()

    __table_args__ = (
        CheckConstraint("name ~ '^[A-Za-z0-9][A-Za-z0-9._-]*$'", name="name_format"),
    )


class Jobset(Base):
    __tablename__ = "jobsets"

    id: Mapped[IntPK]
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    name: Mapped[str]
    description: Mapped[str] = mapped_column(server_default="", default="")
    flake_mode: Mapped[BoolTrue]
    #: flake attribute path (``hydraJobs``) or, in classic mode, ``<input>:<file>`` / file path
    nix_expression: Mapped[str] = mapped_column(server_default="hydraJobs", default="hydraJobs")
    #: classic mode: the input holding ``nix_expression`` (Hydra's nixexprinput)
    nix_expression_input: Mapped[str | None]
    branch: Mapped[str | None]
    state: Mapped[JobsetState] = mapped_column(
        enum_column(JobsetState, "jobset_state"), default=JobsetState.enabled,
        server_default=JobsetState.enabled.value,
    )
    trigger_mode: Mapped[TriggerMode] = mapped_column(
        enum_column(TriggerMode, "trigger_mode"), default=TriggerMode.source_change,
        server_default=TriggerMode.source_change.value,
    )
    check_interval: Mapped[int] = mapped_column(server_default="60", default=60)
    scheduling_shares: Mapped[int] = mapped_column(server_default="100", default=100)
    keep_nr: Mapped[int] = mapped_column(server_default="3", default=3)
    hidden: Mapped[BoolFalse]
    #: rebuild succeeded builds with ``nix-store --check``; a mismatch: non_deterministic
    check_reproducibility: Mapped[BoolFalse]
    last_checked_at: Mapped[datetime | None]
    #: what the last check did: evaluated, unchanged, busy, error
    last_check_outcome: Mapped[str | None]
    #: error of the last failed check (fetch error, bad URL scheme, ...)
    error_message: Mapped[str | None]
    error_at: Mapped[datetime | None]
    managed_declaratively: Mapped[BoolFalse]
    created_at: Mapped[CreatedAt]
    updated_at: Mapped[UpdatedAt]

    project: Mapped[Project] = relationship(back_populates="jobsets")
    inputs: Mapped[list[JobsetInput]] = relationship(
        back_populates="jobset", cascade="all, delete-orphan", passive_deletes=True,
        order_by="JobsetInput.name",
    )
    evaluations: Mapped[list[Evaluation]] = relationship(
        back_populates="jobset", viewonly=True,
    )

    __table_args__ = (
        UniqueConstraint("project_id", "name"),
        CheckConstraint("name ~ '^[A-Za-z0-9][A-Za-z0-9._-]*$'", name="name_format"),
        CheckConstraint("check_interval >= 0", name="check_interval_nonnegative"),
        CheckConstraint("scheduling_shares > 0", name="shares_positive"),
        CheckConstraint("keep_nr >= 0", name="keep_nr_nonnegative"),
        # the beat tick scans enabled jobsets by when they were last checked
        Index("ix_jobsets_due", "state", "last_checked_at"),
    )

    @property
    def enabled(self) -> bool:
        return self.state is not JobsetState.disabled


class JobsetInput(Base):
    __tablename__ = "jobset_inputs"

    id: Mapped[IntPK]
    jobset_id: Mapped[int] = mapped_column(ForeignKey("jobsets.id", ondelete="CASCADE"))
    name: Mapped[str]
    input_type: Mapped[InputType] = mapped_column(enum_column(InputType, "input_type"))
    value: Mapped[str] = mapped_column(server_default="", default="")
    #: pinned revision (git) if any
    revision: Mapped[str | None]
    created_at: Mapped[CreatedAt]

    jobset: Mapped[Jobset] = relationship(back_populates="inputs")

    __table_args__ = (UniqueConstraint("jobset_id", "name"),)


class Channel(Base):
    __tablename__ = "channels"

    id: Mapped[IntPK]
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"),
                                            index=True)
    #: globally unique: the public ``/channel/<name>/`` endpoints address channels by name
    name: Mapped[str] = mapped_column(unique=True)
    jobset_id: Mapped[int] = mapped_column(ForeignKey("jobsets.id", ondelete="CASCADE"),
                                           index=True)
    evaluation_id: Mapped[int | None] = mapped_column(
        ForeignKey("evaluations.id", ondelete="SET NULL"), index=True)
    #: manual: moved only by promote; automatic: follows the newest good evaluation
    mode: Mapped[ChannelMode] = mapped_column(
        enum_column(ChannelMode, "channel_mode"), default=ChannelMode.manual,
        server_default=ChannelMode.manual.value)
    #: automatic mode: only this (aggregate) job must have succeeded, not every build
    aggregate_job: Mapped[str | None]
    #: when the channel last moved (promote or automatic advance)
    moved_at: Mapped[datetime | None]
    managed_declaratively: Mapped[BoolFalse]
    created_at: Mapped[CreatedAt]
    updated_at: Mapped[UpdatedAt]


class ProjectMember(Base):
    __tablename__ = "project_members"

    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"),
                                            primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"),
                                         primary_key=True, index=True)
    role: Mapped[MemberRole] = mapped_column(enum_column(MemberRole, "member_role"),
                                             default=MemberRole.member)
    managed_declaratively: Mapped[BoolFalse]
    created_at: Mapped[CreatedAt]


class WebhookConfig(Base):
    __tablename__ = "webhook_configs"

    id: Mapped[IntPK]
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    forge_type: Mapped[ForgeType] = mapped_column(enum_column(ForgeType, "forge_type"))
    #: the shared secret, encrypted with the server key (HMAC verification needs it back)
    secret_encrypted: Mapped[str | None]
    enabled: Mapped[BoolTrue]
    managed_declaratively: Mapped[BoolFalse]
    created_at: Mapped[CreatedAt]

    __table_args__ = (UniqueConstraint("project_id", "forge_type"),)


class NotificationConfig(Base):
    __tablename__ = "notification_configs"

    id: Mapped[IntPK]
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"),
                                            index=True)
    type: Mapped[NotificationType] = mapped_column(
        enum_column(NotificationType, "notification_type"))
    config: Mapped[JsonDict]
    enabled: Mapped[BoolTrue]
    managed_declaratively: Mapped[BoolFalse]
    created_at: Mapped[CreatedAt]
