"""Builds (one per job per evaluation) and their results."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING

from sqlalchemy import BigInteger, Float, ForeignKey, Index, Numeric, UniqueConstraint, text
from sqlalchemy.orm import Mapped, mapped_column, relationship

from circus.common.enums import BuildStatus
from circus.common.models.base import (
    Base,
    BoolFalse,
    CreatedAt,
    IntEnumColumn,
    IntPK,
    TextList,
)
from circus.common.statussql import PENDING, RUNNING

if TYPE_CHECKING:
    from circus.common.models.evaluations import Evaluation


class Build(Base):
    __tablename__ = "builds"

    id: Mapped[IntPK]
    #: the evaluation that created the build (later ones may link to it, see EvaluationBuild)
    evaluation_id: Mapped[int] = mapped_column(ForeignKey("evaluations.id", ondelete="CASCADE"))
    # denormalised from the evaluation: the API filters and the fair-share order use them.
    # No foreign keys: evaluation_id's covers them (a jobset's or project's deletion
    # cascades through its evaluations), and each would be one more check per row of a
    # 50,000-build import (migration c4e8a1f6d2b9)
    jobset_id: Mapped[int]
    project_id: Mapped[int]
    job_name: Mapped[str]
    drv_path: Mapped[str]
    system: Mapped[str]
    status: Mapped[BuildStatus] = mapped_column(
        IntEnumColumn(BuildStatus), default=BuildStatus.pending, server_default="0")
    priority: Mapped[int] = mapped_column(server_default="0", default=0)
    retry_count: Mapped[int] = mapped_column(server_default="0", default=0)
    max_retries: Mapped[int] = mapped_column(server_default="3", default=3)
    is_aggregate: Mapped[BoolFalse]
    is_fod: Mapped[BoolFalse]
    required_features: Mapped[TextList]
    nix_name: Mapped[str | None]
    meta_description: Mapped[str | None]
    meta_license: Mapped[str | None]
    meta_homepage: Mapped[str | None]
    meta_maintainers: Mapped[str | None]
    #: seconds, from meta.timeout / meta.maxSilent (None: config default)
    timeout: Mapped[int | None]
    max_silent: Mapped[int | None]
    #: from meta.hydra.repeats: > 0 asks for a reproducibility check (nix-store --check)
    repeats: Mapped[int] = mapped_column(server_default="0", default=0)
    #: meta.outputsToInstall: the outputs ``nix-env -i`` installs from a channel (None: unset)
    outputs_to_install: Mapped[list[str] | None]
    created_at: Mapped[CreatedAt]
    #: when the queue runner turned the build into steps (None: not yet)
    stepped_at: Mapped[datetime | None]
    started_at: Mapped[datetime | None]
    completed_at: Mapped[datetime | None]
    error_message: Mapped[str | None]
    keep: Mapped[BoolFalse]
    signed: Mapped[BoolFalse]
    closure_size: Mapped[int | None]
    #: machine, SSH builder or agent that built the top-level derivation
    machine: Mapped[str | None]
    #: set (to the transaction time) whenever the build is queued (stepped), starts or
    #: finishes; the notification collector turns it into notification tasks and clears it
    notification_pending_since: Mapped[datetime | None]

    evaluation: Mapped[Evaluation] = relationship()
    outputs: Mapped[list[BuildOutput]] = relationship(
        back_populates="build", cascade="all, delete-orphan", passive_deletes=True,
        order_by="BuildOutput.name", lazy="selectin",
    )

    __table_args__ = (
        UniqueConstraint("evaluation_id", "job_name"),
        Index("ix_builds_status_priority", "status", text("priority DESC"), "id"),
        Index("ix_builds_jobset_id_job_name", "jobset_id", "job_name", text("id DESC")),
        Index("ix_builds_project_id_id", "project_id", text("id DESC")),
        # a jobset's builds newest first (API lists, a page of them without a sort)
        Index("ix_builds_jobset_id_id", "jobset_id", text("id DESC")),
        # text_pattern_ops: prefix search (LIKE 'x%') under any collation, and equality
        Index("ix_builds_drv_path", "drv_path", postgresql_ops={"drv_path": "text_pattern_ops"}),
        # the builds of a job name found by search, by jobset, newest first
        Index("ix_builds_job_name_jobset_id", "job_name", "jobset_id", text("id DESC")),
        Index("ix_builds_system", "system"),
        Index("ix_builds_completed_at", text("completed_at DESC")),
        # the running builds, started last first (the home page)
        Index("ix_builds_running", text("started_at DESC NULLS LAST"), text("id DESC"),
              postgresql_where=text(f"status = {RUNNING}")),
        # the dispatcher's scan for builds that still need their steps computed
        Index("ix_builds_unstepped", "id",
              postgresql_where=text(f"status = {PENDING} AND stepped_at IS NULL")),
        # the notification collector's scan for builds with an unreported status change
        Index("ix_builds_notification_pending", "notification_pending_since",
              postgresql_where=text("notification_pending_since IS NOT NULL")),
    )

    @property
    def output_map(self) -> dict[str, str]:
        return {o.name: o.path for o in self.outputs}


class JobName(Base):
    """Every job name that was ever built, for substring search: thousands of names,
    where the builds are millions. Written by a trigger on the builds' insert
    (migration ``9c4e2a7d1b36``); not unique (two racing imports may both add a new
    name), read as distinct names."""

    __tablename__ = "job_names"

    id: Mapped[IntPK]
    name: Mapped[str]

    __table_args__ = (
        Index("ix_job_names_name", "name"),
        Index("ix_job_names_name_trgm", "name", postgresql_using="gin",
              postgresql_ops={"name": "gin_trgm_ops"}),
    )


class RollupSums:
    """The figures of a rollup row (:class:`BuildStatusTotal` and the hourly ones)."""

    builds: Mapped[int] = mapped_column(BigInteger)
    #: seconds from start to completion, of the ``durations`` builds that have both
    duration_sum: Mapped[Decimal] = mapped_column(Numeric)
    durations: Mapped[int] = mapped_column(BigInteger)
    #: a sum of delta rows (:func:`circus.common.rollups.compact`), not a delta itself
    merged: Mapped[BoolFalse]


class BuildStatusTotal(RollupSums, Base):
    """Builds per project, jobset, system and status, with the sum and number of their
    durations: ``/builds/stats`` without reading the builds. Delta rows, written by
    statement triggers on the builds' insert, update and delete (migration
    ``b7d2e4f1a9c3``) and never updated, so finishing builds never wait for each other
    on a counter row; :func:`circus.common.rollups.compact` sums the unmerged ones
    into one row per key now and then. A reader sums every row of its key."""

    __tablename__ = "build_status_totals"

    id: Mapped[IntPK]
    project_id: Mapped[int]
    jobset_id: Mapped[int]
    system: Mapped[str]
    status: Mapped[BuildStatus] = mapped_column(IntEnumColumn(BuildStatus))

    __table_args__ = (
        Index("ix_build_status_totals_key", "jobset_id", "project_id", "system", "status"),
        Index("ix_build_status_totals_unmerged", "jobset_id", "project_id", "system",
              "status", postgresql_where=text("NOT merged")),
    )


class BuildCompletionHour(RollupSums, Base):
    """Finished builds per project, jobset, status and hour of ``completed_at`` (UTC),
    with their durations: the time series without reading the builds. Delta rows like
    :class:`BuildStatusTotal`, written by the same triggers."""

    __tablename__ = "build_completion_hours"

    id: Mapped[IntPK]
    project_id: Mapped[int]
    jobset_id: Mapped[int]
    status: Mapped[BuildStatus] = mapped_column(IntEnumColumn(BuildStatus))
    hour: Mapped[datetime]

    __table_args__ = (
        Index("ix_build_completion_hours_key", "jobset_id", "project_id", "status", "hour"),
        Index("ix_build_completion_hours_hour", "hour"),
        Index("ix_build_completion_hours_unmerged", "jobset_id", "project_id", "status",
              "hour", postgresql_where=text("NOT merged")),
    )


class ProjectCompletionHour(RollupSums, Base):
    """:class:`BuildCompletionHour` without the jobset: the time series of all jobsets,
    or of a project's, from an eighth of the rows. Written by the same triggers."""

    __tablename__ = "project_completion_hours"

    id: Mapped[IntPK]
    project_id: Mapped[int]
    status: Mapped[BuildStatus] = mapped_column(IntEnumColumn(BuildStatus))
    hour: Mapped[datetime]

    __table_args__ = (
        Index("ix_project_completion_hours_key", "project_id", "status", "hour"),
        Index("ix_project_completion_hours_hour", "hour"),
        Index("ix_project_completion_hours_unmerged", "project_id", "status", "hour",
              postgresql_where=text("NOT merged")),
    )


#: ids per :class:`BuildIdBlock`
BUILD_ID_BLOCK = 10_000


class BuildIdBlock(Base):
    """Builds per project and block of ``BUILD_ID_BLOCK`` ids (``id / BUILD_ID_BLOCK``):
    the build at offset 500,000 of the newest-first list is found by summing blocks and
    walking inside one, not by walking 500,000 ids. Delta rows written by statement
    triggers on the builds' insert and delete (migration ``c5e1f7a3b9d2``), merged by
    :func:`circus.common.rollups.compact` like :class:`BuildStatusTotal`."""

    __tablename__ = "build_id_blocks"

    id: Mapped[IntPK]
    project_id: Mapped[int]
    block: Mapped[int]
    builds: Mapped[int] = mapped_column(BigInteger)
    merged: Mapped[BoolFalse]

    __table_args__ = (
        Index("ix_build_id_blocks_key", "project_id", "block"),
        Index("ix_build_id_blocks_unmerged", "project_id", "block",
              postgresql_where=text("NOT merged")),
    )


class BuildOutput(Base):
    __tablename__ = "build_outputs"

    build_id: Mapped[int] = mapped_column(ForeignKey("builds.id", ondelete="CASCADE"),
                                          primary_key=True)
    name: Mapped[str] = mapped_column(primary_key=True)
    path: Mapped[str]

    build: Mapped[Build] = relationship(back_populates="outputs")

    __table_args__ = (
        # text_pattern_ops: store-path prefix search (LIKE 'x%') under any collation
        Index("ix_build_outputs_path", "path", postgresql_ops={"path": "text_pattern_ops"}),
    )


class BuildDependency(Base):
    """Build-to-build edge within an evaluation: ``build`` needs ``dependency``'s output."""

    __tablename__ = "build_dependencies"

    build_id: Mapped[int] = mapped_column(ForeignKey("builds.id", ondelete="CASCADE"),
                                          primary_key=True)
    dependency_id: Mapped[int] = mapped_column(ForeignKey("builds.id", ondelete="CASCADE"),
                                               primary_key=True, index=True)


class BuildConstituent(Base):
    """Aggregate build → constituent build."""

    __tablename__ = "build_constituents"

    aggregate_id: Mapped[int] = mapped_column(ForeignKey("builds.id", ondelete="CASCADE"),
                                              primary_key=True)
    constituent_id: Mapped[int] = mapped_column(ForeignKey("builds.id", ondelete="CASCADE"),
                                                primary_key=True, index=True)


class BuildProduct(Base):
    __tablename__ = "build_products"

    id: Mapped[IntPK]
    build_id: Mapped[int] = mapped_column(ForeignKey("builds.id", ondelete="CASCADE"),
                                          index=True)
    type: Mapped[str]
    subtype: Mapped[str]
    name: Mapped[str]
    path: Mapped[str]
    default_path: Mapped[str | None]
    sha256: Mapped[str | None]
    file_size: Mapped[int | None]
    content_type: Mapped[str | None]
    is_directory: Mapped[BoolFalse]


class BuildMetric(Base):
    __tablename__ = "build_metrics"

    build_id: Mapped[int] = mapped_column(ForeignKey("builds.id", ondelete="CASCADE"),
                                          primary_key=True)
    name: Mapped[str] = mapped_column(primary_key=True)
    value: Mapped[float] = mapped_column(Float)
    unit: Mapped[str | None]


class PendingPostprocessing(Base):
    """A succeeded build whose post-processing (cache publish, closure size, GC root) is
    not done yet: written in the transaction that finishes the build, deleted once it
    is done, so a queue runner killed or a database stopped in between only delays it
    (``circus.queue_runner.builds.postprocess``)."""

    __tablename__ = "pending_postprocessing"

    build_id: Mapped[int] = mapped_column(ForeignKey("builds.id", ondelete="CASCADE"),
                                          primary_key=True)
    since: Mapped[CreatedAt]
    #: tries that did not finish (the in-process one after the build is not counted)
    attempts: Mapped[int] = mapped_column(server_default="0", default=0)
    #: the next retry is due then (back-off; the in-process try comes first)
    not_before: Mapped[datetime]
    last_error: Mapped[str | None]

    __table_args__ = (
        Index("ix_pending_postprocessing_not_before", "not_before"),
    )


class FailedPath(Base):
    """The failed-path cache: a derivation that failed recently fails again at once."""

    __tablename__ = "failed_paths"

    drv_path: Mapped[str] = mapped_column(primary_key=True)
    build_id: Mapped[int | None] = mapped_column(ForeignKey("builds.id", ondelete="SET NULL"),
                                                 index=True)
    status: Mapped[BuildStatus] = mapped_column(IntEnumColumn(BuildStatus))
    failed_at: Mapped[CreatedAt]
