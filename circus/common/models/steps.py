"""Derivation steps: the unit the queue runner schedules (DESIGN §3).

A ``Step`` is one derivation to realise. Builds that need the same derivation
share its active step (at most one unfinished step per ``drv_path``); the
``build_steps`` table records, per build, every step it waited for, so users
see which dependency failed and history survives restarts.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import CheckConstraint, ForeignKey, Index, UniqueConstraint, text
from sqlalchemy.orm import Mapped, mapped_column

from circus.common.enums import BuildStatus, StepState
from circus.common.models.base import (
    Base,
    BoolFalse,
    CreatedAt,
    IntEnumColumn,
    IntPK,
    TextList,
    enum_column,
)


class Step(Base):
    __tablename__ = "steps"

    id: Mapped[IntPK]
    drv_path: Mapped[str]
    system: Mapped[str]
    required_features: Mapped[TextList]
    #: queue class: ``<system>`` or ``<system>.<feature>+<feature>`` (sorted)
    queue_class: Mapped[str]
    state: Mapped[StepState] = mapped_column(
        enum_column(StepState, "step_state"), default=StepState.pending,
        server_default=StepState.pending.value)
    #: outcome once ``state`` is done
    status: Mapped[BuildStatus | None] = mapped_column(IntEnumColumn(BuildStatus))
    #: highest priority of the builds waiting for it
    priority: Mapped[int] = mapped_column(server_default="0", default=0)
    #: jobset for fair-share ordering (the first build's)
    jobset_id: Mapped[int | None] = mapped_column(ForeignKey("jobsets.id", ondelete="SET NULL"))
    #: number of builds (transitively) waiting on it; larger = more critical
    dependents: Mapped[int] = mapped_column(server_default="0", default=0)
    is_fod: Mapped[BoolFalse]
    #: seconds; None means the queue runner's defaults
    timeout: Mapped[int | None]
    max_silent: Mapped[int | None]
    created_at: Mapped[CreatedAt]
    queued_at: Mapped[datetime | None]
    #: last time a wake-up message for it was published (the reconciler re-publishes)
    published_at: Mapped[datetime | None]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    #: who holds it while running (worker name, ``ssh:<builder>``, ``agent:<machine id>``)
    worker: Mapped[str | None]
    #: a running step whose lease lapsed is returned to the queue by the reconciler
    lease_until: Mapped[datetime | None]
    #: infrastructure attempts so far (aborted builds are retried with back-off)
    attempts: Mapped[int] = mapped_column(server_default="0", default=0)
    #: earliest time a retried step may run again
    not_before: Mapped[datetime | None]
    machine: Mapped[str | None]
    exit_code: Mapped[int | None]
    error_message: Mapped[str | None]
    log_path: Mapped[str | None]
    log_size: Mapped[int | None]

    __table_args__ = (
        # builds share the one unfinished step of a derivation
        Index("uq_steps_active_drv_path", "drv_path", unique=True,
              postgresql_where=text("state <> 'done'")),
        Index("ix_steps_drv_path", "drv_path"),
        # runnable steps of one class; a claim's candidates are the head of each
        # jobset's queue (leases._heads)
        Index("ix_steps_queued_by_jobset", "queue_class", "jobset_id", text("priority DESC"),
              "id", postgresql_where=text("state = 'queued'")),
        Index("ix_steps_state", "state"),
        Index("ix_steps_lease", "lease_until", postgresql_where=text("state = 'running'")),
        CheckConstraint("(state = 'done') = (status IS NOT NULL)", name="status_iff_done"),
    )


class StepDependency(Base):
    """``step`` cannot run before ``depends_on`` succeeded."""

    __tablename__ = "step_dependencies"

    step_id: Mapped[int] = mapped_column(ForeignKey("steps.id", ondelete="CASCADE"),
                                         primary_key=True)
    depends_on_id: Mapped[int] = mapped_column(ForeignKey("steps.id", ondelete="CASCADE"),
                                               primary_key=True, index=True)


class BuildStep(Base):
    """A step a build waited for; ``step_nr`` orders them per build (Hydra's BuildSteps)."""

    __tablename__ = "build_steps"

    id: Mapped[IntPK]
    build_id: Mapped[int] = mapped_column(ForeignKey("builds.id", ondelete="CASCADE"))
    step_nr: Mapped[int]
    step_id: Mapped[int] = mapped_column(ForeignKey("steps.id", ondelete="CASCADE"), index=True)
    drv_path: Mapped[str]
    #: the build's own top-level derivation (its log is the build log)
    is_toplevel: Mapped[BoolFalse]
    #: when this step failed because another step failed, that step
    propagated_from_step_id: Mapped[int | None] = mapped_column(
        ForeignKey("steps.id", ondelete="SET NULL"))
    created_at: Mapped[CreatedAt]

    __table_args__ = (
        UniqueConstraint("build_id", "step_nr"),
        Index("ix_build_steps_build_id_step_id", "build_id", "step_id", unique=True),
    )


class QueueClass(Base):
    """A queue class seen by the dispatcher: ``<system>[.<f1>+<f2>...]`` (sorted features).

    Consumers (local workers, SSH workers, the agent gateway) poll this small
    table to subscribe to new classes they can serve; the reconciler records
    when nobody could serve a class, to fail its steps after ``unsupported_timeout``.
    """

    __tablename__ = "queue_classes"

    name: Mapped[str] = mapped_column(primary_key=True)
    system: Mapped[str]
    required_features: Mapped[TextList]
    created_at: Mapped[CreatedAt]
    #: since when no live consumer could serve it (None: servable)
    unsupported_since: Mapped[datetime | None]
