"""Pages of builds and evaluations as JSON without ORM entities and a marshmallow dump
per item.

A page of 50 builds cost more in Python than in SQL (bench data, loaded host: ~8 ms of
ORM loading, entities and their outputs' selectin, and ~10 ms of ``BuildSchema.dump``,
29 fields a build, where the page's statements took ~5 ms). The lists read the columns
as tuples and make the dictionaries ``BuildSchema`` (``EvaluationSchema``) would dump
(tests/api/test_builds.py compares them); the schemas stay the documented shapes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from circus.common.enums import BuildStatus, EvaluationStatus, TriggerKind
from circus.common.models import Build, BuildOutput, Evaluation, Jobset

#: columns dumped as they are read
_PLAIN = ("id", "evaluation_id", "jobset_id", "project_id", "job_name", "nix_name",
          "drv_path", "system", "required_features", "is_aggregate", "is_fod", "priority",
          "retry_count", "error_message", "keep", "signed", "closure_size", "machine",
          "meta_description", "meta_license", "meta_homepage", "meta_maintainers")
#: dumped as ISO 8601, like marshmallow's DateTime
_TIMES = ("created_at", "started_at", "completed_at")
_PLAIN_COUNT = len(_PLAIN)
_STATUS = _PLAIN_COUNT + len(_TIMES)

#: what :func:`build_dicts` needs of each build, in this order (``id`` first)
COLUMNS = tuple(getattr(Build, name) for name in (*_PLAIN, *_TIMES, "status"))


def select_builds() -> Any:
    """``select(Build)`` for lists, as the columns :func:`build_dicts` reads."""
    return select(*COLUMNS)


def build_dicts(session: Session, rows: Sequence[tuple[Any, ...]]) -> list[dict[str, Any]]:
    """The builds of ``rows`` (tuples of :data:`COLUMNS`) as ``BuildSchema`` dumps them,
    with their outputs (one statement)."""
    outputs: dict[int, dict[str, str]] = {row[0]: {} for row in rows}
    if outputs:
        for build_id, name, path in session.execute(
                select(BuildOutput.build_id, BuildOutput.name, BuildOutput.path)
                .where(BuildOutput.build_id.in_(list(outputs)))):
            outputs[build_id][name] = path
    items = []
    for row in rows:
        item = dict(zip(_PLAIN, row[:_PLAIN_COUNT], strict=True))
        for name, value in zip(_TIMES, row[_PLAIN_COUNT:_STATUS], strict=True):
            item[name] = None if value is None else value.isoformat()
        status: BuildStatus = row[_STATUS]
        item["status"] = status.name
        item["status_code"] = int(status)
        item["finished"] = status.is_finished
        item["outputs"] = outputs[row[0]]
        items.append(item)
    return items


_EVALUATION_PLAIN = ("id", "jobset_id", "commit_hash", "inputs_hash", "flake_ref",
                     "attrs_total", "attrs_done", "builds_new", "builds_reused",
                     "error_message", "requested_by", "pr_number", "pr_head_branch",
                     "pr_base_branch", "pr_action")
_EVALUATION_PLAIN_COUNT = len(_EVALUATION_PLAIN)

#: what :func:`evaluation_dicts` needs of each evaluation, in this order (``id`` first;
#: not ``inputs`` or ``stderr_tail``, which the list does not show)
EVALUATION_COLUMNS = tuple(getattr(Evaluation, name) for name in (
    *_EVALUATION_PLAIN, "created_at", "started_at", "finished_at", "eval_time", "status",
    "trigger_kind"))


def select_evaluations() -> Any:
    """``select(Evaluation)`` for lists, as the columns :func:`evaluation_dicts` reads."""
    return select(*EVALUATION_COLUMNS)


def evaluation_dicts(session: Session, rows: Sequence[tuple[Any, ...]],
                     build_counts: dict[int, dict[str, int]]) -> list[dict[str, Any]]:
    """The evaluations of ``rows`` (tuples of :data:`EVALUATION_COLUMNS`) as
    ``EvaluationSchema`` dumps them, with their projects (one statement) and
    ``build_counts``."""
    jobsets = {row[1] for row in rows}
    projects = dict(session.execute(select(Jobset.id, Jobset.project_id)
                                    .where(Jobset.id.in_(jobsets))).tuples().all()
                    ) if jobsets else {}
    items = []
    for row in rows:
        item = dict(zip(_EVALUATION_PLAIN, row[:_EVALUATION_PLAIN_COUNT], strict=True))
        created_at, started_at, finished_at, eval_time, status, trigger_kind = row[
            _EVALUATION_PLAIN_COUNT:]
        item["created_at"] = created_at.isoformat()
        item["started_at"] = None if started_at is None else started_at.isoformat()
        item["finished_at"] = None if finished_at is None else finished_at.isoformat()
        item["eval_time"] = None if eval_time is None else float(eval_time)
        evaluation_status: EvaluationStatus = status
        kind: TriggerKind = trigger_kind
        item["status"] = evaluation_status.value
        item["trigger_kind"] = kind.value
        item["project_id"] = projects[row[1]]
        item["build_counts"] = build_counts.get(row[0], {})
        items.append(item)
    return items
