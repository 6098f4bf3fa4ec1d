"""Read queries shared by the API views (and the dashboard): filters, counts, lookups."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import case, func, literal, or_, select, union_all
from sqlalchemy.orm import Session, joinedload

from circus.auth.actor import Actor
from circus.auth.visibility import (
    can_see_project,
    hidden_project_ids,
    only_visible,
    require_visible,
)
from circus.common.enums import ACTIVE_STEP_STATES, BuildStatus
from circus.common.errors import NotFound
from circus.common.heartbeat import fresh_build_slot_holders
from circus.common.models import (
    Build,
    BuildCompletionHour,
    BuilderSession,
    BuildIdBlock,
    BuildOutput,
    BuildStatusTotal,
    Evaluation,
    EvaluationBuild,
    EvaluationTotal,
    JobName,
    Jobset,
    Project,
    ProjectCompletionHour,
    RemoteBuilder,
    Step,
    User,
)
from circus.common.models.builds import BUILD_ID_BLOCK
from circus.evaluator.counts import loaded_status_counts, status_counts


def filter_builds(query: Any, args: dict[str, Any], actor: Actor) -> Any:
    query = only_visible(query, Build.project_id, actor)
    if "project_id" in args:
        query = query.where(Build.project_id == args["project_id"])
    if "jobset_id" in args:
        query = query.where(Build.jobset_id == args["jobset_id"])
    if "evaluation_id" in args:
        # membership alone: the importer writes a row for every build of an evaluation,
        # the ones it created too (``OR builds.evaluation_id = X`` turned the plan into a
        # scan of all builds); a join, not IN: newest first is then the membership index
        # read backwards
        query = query.join(EvaluationBuild, EvaluationBuild.build_id == Build.id).where(
            EvaluationBuild.evaluation_id == args["evaluation_id"])
    if "job_name" in args:
        query = query.where(Build.job_name == args["job_name"])
    return query.where(*status_filters(Build, args))


def status_filters(builds: Any, args: dict[str, Any]) -> list[Any]:
    """The ``status``, ``system`` and ``finished`` filters of ``args`` on the builds (or
    on ``build_status_totals``, whose key holds both columns)."""
    unfinished = [BuildStatus.pending, BuildStatus.running]
    return ([builds.status == args["status"]] if "status" in args else []) + (
        [builds.system == args["system"]] if "system" in args else []) + (
        [] if "finished" not in args else
        [builds.status.not_in(unfinished) if args["finished"]
         else builds.status.in_(unfinished)])


#: the builds list's filters whose total ``build_status_totals`` holds (its key)
_TOTALLED_BY_ROLLUP = frozenset({"project_id", "jobset_id", "status", "system", "finished"})
#: the filters that may go with ``evaluation_id`` for its total from its status counts
_TOTALLED_BY_EVALUATION = frozenset({"evaluation_id", "status", "finished"})
_PAGE_ARGS = frozenset({"limit", "offset", "cursor"})


def build_total(session: Session, args: dict[str, Any], actor: Actor) -> int | None:
    """The exact number of builds :func:`filter_builds` lists for ``args``, when a
    rollup holds it (``None``: count the list).

    Counting the list itself read up to 10,001 builds a page (and the plan's estimate
    before that): the rollup of the builds' triggers answers the filters of its key in
    a few rows, and an evaluation's stored status counts answer its builds."""
    filters = set(args) - _PAGE_ARGS
    if filters <= _TOTALLED_BY_ROLLUP:
        query = only_visible(select(func.sum(BuildStatusTotal.builds)),
                             BuildStatusTotal.project_id, actor).where(
            *rollup_filters(BuildStatusTotal, args), *status_filters(BuildStatusTotal, args))
        return int(session.scalar(query) or 0)
    if filters <= _TOTALLED_BY_EVALUATION:
        evaluation_id = args["evaluation_id"]
        # an evaluation's builds are all its jobset's (reuse never crosses jobsets):
        # hidden or not with its project
        project_id = session.scalar(select(Jobset.project_id).join(
            Evaluation, Evaluation.jobset_id == Jobset.id).where(Evaluation.id == evaluation_id))
        if project_id is None or not can_see_project(session, actor, project_id):
            return 0
        counts = status_counts(session, [evaluation_id]).get(evaluation_id, {})
        return sum(n for name, n in counts.items() if _status_wanted(BuildStatus[name], args))
    return None


def build_id_at_offset(session: Session, args: dict[str, Any], actor: Actor
                       ) -> Callable[[int], int | None] | None:
    """For the newest-first list of builds ``args`` filters, a function giving the id at
    an offset (``None``: past the end) from ``build_id_blocks``, or ``None`` when the
    filters are more than a project's.

    Walking to offset 500,000 read 500,000 ids of the primary key (~110 ms on the bench
    data); the blocks' counts (a hundred per million builds and project) find the block
    of the offset, and the walk inside it reads at most ``BUILD_ID_BLOCK`` ids."""
    if not set(args) - _PAGE_ARGS <= {"project_id"}:
        return None

    def at(offset: int) -> int | None:
        blocks = session.execute(only_visible(
            select(BuildIdBlock.block, func.sum(BuildIdBlock.builds)),
            BuildIdBlock.project_id, actor).where(*rollup_filters(BuildIdBlock, args))
            .group_by(BuildIdBlock.block).having(func.sum(BuildIdBlock.builds) != 0)
            .order_by(BuildIdBlock.block.desc()))
        ids = filter_builds(select(Build.id), args, actor).order_by(Build.id.desc())
        before = 0
        for block, builds in blocks:
            if offset < before + builds:
                found: int | None = session.scalar(ids.where(
                    Build.id >= block * BUILD_ID_BLOCK, Build.id < (block + 1) * BUILD_ID_BLOCK)
                    .offset(offset - before).limit(1))
                if found is None:
                    # builds of the block deleted after the blocks were read: walk
                    found = session.scalar(ids.offset(offset).limit(1))
                return found
            before += builds
        return None

    return at


def _status_wanted(status: BuildStatus, args: dict[str, Any]) -> bool:
    """Whether builds of ``status`` pass the ``status`` and ``finished`` filters."""
    if "status" in args and status != args["status"]:
        return False
    return "finished" not in args or status.is_finished == args["finished"]


def rollup_filters(rollup: Any, args: dict[str, Any]) -> list[Any]:
    """The ``project_id`` and ``jobset_id`` filters of ``args`` on a rollup of the builds
    (or on the builds)."""
    return ([rollup.project_id == args["project_id"]] if "project_id" in args else []) + (
        [rollup.jobset_id == args["jobset_id"]] if "jobset_id" in args else [])


def completions(since: datetime, args: dict[str, Any], actor: Actor) -> Any:
    """A subquery of the builds finished since ``since`` that ``actor`` may see (and
    ``args`` filter, see :func:`rollup_filters`) as rows (t, status, builds,
    duration_sum, durations) to be summed: whole hours from the rollup the builds'
    triggers keep (``t`` the hour), the part of an hour before the first whole one from
    the builds themselves through the ``completed_at`` index (``t`` the completion)."""
    first_hour = since.replace(minute=0, second=0, microsecond=0)
    if first_hour < since:
        first_hour += timedelta(hours=1)
    # one jobset's rows by its index; all jobsets' from the rollup without them
    rollup: Any = BuildCompletionHour if "jobset_id" in args else ProjectCompletionHour
    hours = only_visible(select(
        rollup.hour.label("t"), rollup.status.label("status"), rollup.builds.label("builds"),
        rollup.duration_sum.label("duration_sum"), rollup.durations.label("durations"),
    ).where(rollup.hour >= first_hour, *rollup_filters(rollup, args)),
        rollup.project_id, actor)
    seconds = func.extract("epoch", Build.completed_at - Build.started_at)
    partial = only_visible(select(
        Build.completed_at, Build.status, literal(1), func.coalesce(seconds, 0),
        case((seconds.is_(None), 0), else_=1),
    ).where(Build.completed_at >= since, Build.completed_at < first_hour,
            *rollup_filters(Build, args)), Build.project_id, actor)
    return union_all(hours, partial).subquery()


def filter_evaluations(query: Any, args: dict[str, Any], actor: Actor,
                       table: Any = Evaluation) -> Any:
    """``query`` of evaluations (or of ``table``, a rollup of them with their jobset,
    status and trigger kind) filtered by ``args`` and the visibility of ``actor``."""
    hidden = hidden_project_ids(actor)
    if hidden is not None:
        query = query.where(table.jobset_id.not_in(
            select(Jobset.id).where(Jobset.project_id.in_(hidden))))
    if "jobset_id" in args:
        query = query.where(table.jobset_id == args["jobset_id"])
    if "project_id" in args:
        query = query.where(table.jobset_id.in_(
            select(Jobset.id).where(Jobset.project_id == args["project_id"])))
    if "status" in args:
        query = query.where(table.status == args["status"])
    if "trigger_kind" in args:
        query = query.where(table.trigger_kind == args["trigger_kind"])
    return query


def evaluation_total(session: Session, args: dict[str, Any], actor: Actor) -> int:
    """The exact number of evaluations :func:`filter_evaluations` lists for ``args``,
    from ``evaluation_totals`` (whose key are the list's filters), not the list."""
    return int(session.scalar(filter_evaluations(
        select(func.sum(EvaluationTotal.evaluations)), args, actor, EvaluationTotal)) or 0)


def build_counts(session: Session, evaluation_ids: Iterable[int]) -> dict[int, dict[str, int]]:
    """Builds of each evaluation by status name (stored once the evaluation settled)."""
    return status_counts(session, evaluation_ids)


def loaded_build_counts(session: Session, evaluations: Iterable[Evaluation]
                        ) -> dict[int, dict[str, int]]:
    """:func:`build_counts` of evaluations just loaded (what is stored read with them)."""
    return loaded_status_counts(session, evaluations)


def get_evaluation(session: Session, evaluation_id: int, actor: Actor) -> Evaluation:
    # with its jobset (the visibility check and the API's project_id need it): one
    # statement, not two
    evaluation = session.get(Evaluation, evaluation_id, options=[joinedload(Evaluation.jobset)])
    if evaluation is None:
        raise NotFound(f"no evaluation with id {evaluation_id}")
    require_visible(session, actor, evaluation.jobset.project_id,
                    f"evaluation with id {evaluation_id}")
    return evaluation


def get_build(session: Session, build_id: int, actor: Actor) -> Build:
    build = session.get(Build, build_id)
    if build is None:
        raise NotFound(f"no build with id {build_id}")
    require_visible(session, actor, build.project_id, f"build with id {build_id}")
    return build


def search(session: Session, actor: Actor, q: str, limit: int) -> dict[str, Any]:
    """Projects, jobsets, jobs, builds (by id or drv path) and store paths matching ``q``
    (in projects ``actor`` may see)."""
    q = q.strip()
    projects = session.scalars(only_visible(select(Project), Project.id, actor).where(or_(
        Project.name.icontains(q, autoescape=True),
        Project.description.icontains(q, autoescape=True))).order_by(Project.name).limit(limit))
    jobsets = session.scalars(only_visible(select(Jobset), Jobset.project_id, actor)
                              .where(Jobset.name.icontains(q, autoescape=True))
                              .order_by(Jobset.name).limit(limit))
    # the names first, among the distinct ones (ILIKE, not lower() LIKE: their trigram
    # index serves it), then their builds by name and jobset: searching the builds
    # themselves read the trigrams every build shares, a million entries each
    names = list(session.scalars(
        select(JobName.name).distinct()
        .where(JobName.name.ilike(f"%{escape_like(q)}%", escape="\\"),
               only_visible(select(Build.id), Build.project_id, actor)
               .where(Build.job_name == JobName.name).exists())
        .order_by(JobName.name).limit(limit)))
    jobs: Any = session.execute(
        only_visible(select(Build.jobset_id, Build.job_name, func.max(Build.id),
                            func.min(Build.project_id)), Build.project_id, actor)
        .where(Build.job_name.in_(names))
        .group_by(Build.job_name, Build.jobset_id)
        .order_by(Build.job_name, Build.jobset_id).limit(limit)) if names else []
    builds: list[dict[str, Any]] = []
    if q.isdigit() and len(q) < 19:
        build = session.get(Build, int(q))
        if build is not None and can_see_project(session, actor, build.project_id):
            builds.append(_build_hit(build))
    if q.startswith("/nix/store/") or len(q) >= 8:
        prefix = q if q.startswith("/") else f"/nix/store/{q}"
        builds += [_build_hit(b) for b in session.scalars(
            only_visible(select(Build), Build.project_id, actor)
            .where(Build.drv_path.startswith(prefix, autoescape=True))
            .order_by(Build.id.desc()).limit(limit))]
    paths: Any = session.execute(
        only_visible(select(BuildOutput.path, BuildOutput.build_id)
                     .join(Build, Build.id == BuildOutput.build_id), Build.project_id, actor)
        .where(BuildOutput.path.startswith(q if q.startswith("/") else f"/nix/store/{q}",
                                           autoescape=True))
        .order_by(BuildOutput.build_id.desc()).limit(limit)) if len(q) >= 3 else []
    return {
        "query": q,
        "projects": [{"kind": "project", "id": p.id, "name": p.name, "project_id": p.id}
                     for p in projects],
        "jobsets": [{"kind": "jobset", "id": j.id, "name": j.name, "project_id": j.project_id,
                     "jobset_id": j.id} for j in jobsets],
        "jobs": [{"kind": "job", "id": None, "name": name, "jobset_id": jobset_id,
                  "project_id": project_id, "build_id": build_id}
                 for jobset_id, name, build_id, project_id in jobs],
        "builds": builds[:limit],
        "store_paths": [{"kind": "store_path", "id": None, "name": path, "build_id": build_id}
                        for path, build_id in paths],
    }


def escape_like(text: str) -> str:
    """``text`` matched literally inside a LIKE pattern (escape character ``\\``)."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _build_hit(build: Build) -> dict[str, Any]:
    return {"kind": "build", "id": build.id, "name": build.job_name, "build_id": build.id,
            "project_id": build.project_id, "jobset_id": build.jobset_id}


def system_counts(session: Session) -> dict[str, int]:
    """Rows per main table and the live work (the admin overview of API and dashboard)."""
    counts = {}
    for name, model in (("projects", Project), ("jobsets", Jobset), ("evaluations", Evaluation),
                        ("builds", Build), ("users", User), ("remote_builders", RemoteBuilder)):
        counts[name] = int(session.scalar(select(func.count()).select_from(model)) or 0)
    counts["builds_pending"] = int(session.scalar(
        select(func.count()).select_from(Build).where(Build.status == BuildStatus.pending)) or 0)
    counts["steps_active"] = int(session.scalar(
        select(func.count()).select_from(Step).where(Step.state.in_(ACTIVE_STEP_STATES))) or 0)
    counts["agents_connected"] = int(session.scalar(
        select(func.count()).select_from(BuilderSession).where(
            BuilderSession.connected.is_(True))) or 0)
    return counts


def systems_summary(session: Session, actor: Actor) -> list[dict[str, Any]]:
    """Per system: queued, running, succeeded and failed builds ``actor`` may see, and
    machines serving it: enabled SSH builders, connected agents, and the queue runners
    and remote Celery workers whose heartbeat is fresh and names build slots of their own
    (the consumers the reconciler counts, ``live_consumers``). A system built only by
    the queue runner's local workers (``circus up``) has one machine, not none."""
    # from the rollup the builds' triggers keep, not the builds
    rows = session.execute(only_visible(
        select(BuildStatusTotal.system, BuildStatusTotal.status,
               func.sum(BuildStatusTotal.builds)), BuildStatusTotal.project_id, actor)
        .group_by(BuildStatusTotal.system, BuildStatusTotal.status)
        .having(func.sum(BuildStatusTotal.builds) != 0))
    table: dict[str, dict[str, int]] = {}

    def entry(system: str) -> dict[str, int]:
        return table.setdefault(system, {"pending": 0, "running": 0, "succeeded": 0,
                                         "failed": 0, "machines": 0})

    for system, status, count in rows:
        if status in (BuildStatus.pending, BuildStatus.running, BuildStatus.succeeded):
            entry(system)[status.name] += int(count)
        else:
            entry(system)["failed"] += int(count)
    machines: list[list[str]] = [list(s) for s in session.scalars(
        select(RemoteBuilder.systems).where(RemoteBuilder.enabled.is_(True)))]
    machines += [list(s) for s in session.scalars(
        select(BuilderSession.systems).where(BuilderSession.connected.is_(True)))]
    for details in fresh_build_slot_holders(session):
        # a queue runner without local workers (agents and SSH builders only) reports none
        found = details.get("capabilities") if isinstance(details, dict) else None
        for capabilities in found if isinstance(found, list) else []:
            systems = capabilities.get("systems") if isinstance(capabilities, dict) else None
            if isinstance(systems, list):
                machines.append([s for s in systems if isinstance(s, str)])
    for systems_of_machine in machines:
        for system in systems_of_machine:
            entry(system)["machines"] += 1
    return [{"system": s, **v} for s, v in sorted(table.items())]
