"""Evaluations of jobsets and the per-job errors they found."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import BigInteger, ForeignKey, Index, text
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import Mapped, mapped_column, relationship

from circus.common.enums import EvaluationStatus, TriggerKind
from circus.common.models.base import Base, BoolFalse, CreatedAt, IntPK, JsonDict, enum_column
from circus.common.statussql import EVALUATION_ACTIVE

if TYPE_CHECKING:
    from circus.common.models.projects import Jobset


class Evaluation(Base):
    __tablename__ = "evaluations"

    id: Mapped[IntPK]
    jobset_id: Mapped[int] = mapped_column(ForeignKey("jobsets.id", ondelete="CASCADE"))
    #: revision of the jobset's main input (flake: the locked git revision)
    commit_hash: Mapped[str | None]
    #: hash over expression, inputs and their revisions; equal hash = unchanged jobset
    inputs_hash: Mapped[str | None]
    #: every input as evaluated: {name: {type, value, revision, ...}}
    inputs: Mapped[JsonDict]
    #: the locked flake reference that was evaluated
    flake_ref: Mapped[str | None]
    trigger_kind: Mapped[TriggerKind] = mapped_column(enum_column(TriggerKind, "trigger_kind"))
    status: Mapped[EvaluationStatus] = mapped_column(
        enum_column(EvaluationStatus, "evaluation_status"), default=EvaluationStatus.pending,
        server_default=EvaluationStatus.pending.value,
    )
    error_message: Mapped[str | None]
    #: last lines of the evaluator's stderr when it failed
    stderr_tail: Mapped[str | None]
    created_at: Mapped[CreatedAt]
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    #: seconds spent evaluating
    eval_time: Mapped[float | None]
    attrs_total: Mapped[int | None]
    attrs_done: Mapped[int | None]
    builds_new: Mapped[int | None]
    builds_reused: Mapped[int | None]
    #: once the evaluation has finished: its finished builds by status code (``{"2":
    #: 1990, "3": 10}``), which change no more, and the ids of its builds unfinished
    #: then, whose status lists look up; NULL until stored (evaluator/counts.py), and
    #: reset by a trigger when a finished build changes status again (a restart)
    status_counts: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    unfinished_build_ids: Mapped[list[int] | None] = mapped_column(ARRAY(BigInteger))
    #: who/what asked for it (user, webhook delivery, ...)
    requested_by: Mapped[str | None]
    pr_number: Mapped[int | None]
    pr_head_branch: Mapped[str | None]
    pr_base_branch: Mapped[str | None]
    pr_action: Mapped[str | None]
    hidden: Mapped[BoolFalse]
    #: celery task id of the evaluation run (for cancel)
    task_id: Mapped[str | None]

    jobset: Mapped[Jobset] = relationship(back_populates="evaluations")
    errors: Mapped[list[EvaluationError]] = relationship(
        back_populates="evaluation", cascade="all, delete-orphan", passive_deletes=True,
        order_by="EvaluationError.job_name",
    )

    __table_args__ = (
        Index("ix_evaluations_jobset_id_id", "jobset_id", text("id DESC")),
        Index("ix_evaluations_status", "status"),
        # at most one unfinished evaluation per jobset: two concurrent triggers converge
        Index("uq_evaluations_one_active_per_jobset", "jobset_id", unique=True,
              postgresql_where=text(f"status IN {EVALUATION_ACTIVE}")),
    )

    @property
    def is_pull_request(self) -> bool:
        return self.pr_number is not None


class EvaluationError(Base):
    __tablename__ = "evaluation_errors"

    id: Mapped[IntPK]
    evaluation_id: Mapped[int] = mapped_column(
        ForeignKey("evaluations.id", ondelete="CASCADE"), index=True)
    job_name: Mapped[str]
    message: Mapped[str]

    evaluation: Mapped[Evaluation] = relationship(back_populates="errors")


class EvaluationBuild(Base):
    """Membership of a build in an evaluation (Hydra's JobsetEvalMembers).

    A build is created by one evaluation; later evaluations whose job has the same
    derivation link to it here instead of queueing a duplicate.
    """

    __tablename__ = "evaluation_builds"

    evaluation_id: Mapped[int] = mapped_column(
        ForeignKey("evaluations.id", ondelete="CASCADE"), primary_key=True)
    build_id: Mapped[int] = mapped_column(
        ForeignKey("builds.id", ondelete="CASCADE"), primary_key=True, index=True)
    is_new: Mapped[bool]
    created_at: Mapped[CreatedAt]


class EvaluationTotal(Base):
    """Evaluations per jobset, status and trigger kind: the exact total of every list of
    evaluations without counting it. Delta rows written by statement triggers on the
    evaluations' insert, update, delete and truncate (migration ``d8f2b6c1e4a7``),
    merged by :func:`circus.common.rollups.compact`; a reader sums every row of its key."""

    __tablename__ = "evaluation_totals"

    id: Mapped[IntPK]
    jobset_id: Mapped[int]
    status: Mapped[EvaluationStatus] = mapped_column(
        enum_column(EvaluationStatus, "evaluation_totals_status"))
    trigger_kind: Mapped[TriggerKind] = mapped_column(
        enum_column(TriggerKind, "evaluation_totals_trigger_kind"))
    evaluations: Mapped[int] = mapped_column(BigInteger)
    merged: Mapped[BoolFalse]

    __table_args__ = (
        Index("ix_evaluation_totals_key", "jobset_id", "status", "trigger_kind"),
        Index("ix_evaluation_totals_unmerged", "jobset_id", "status", "trigger_kind",
              postgresql_where=text("NOT merged")),
    )
