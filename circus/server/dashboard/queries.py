"""Read queries of the dashboard pages.

Every list is fetched with a fixed number of statements whatever its length:
names of related rows come from joins, per-row figures from one grouped query
over all ids of the page (never a query per row).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cached_property
from typing import Any

from sqlalchemy import and_, func, literal, select
from sqlalchemy.orm import Session, lazyload

from circus.auth.actor import Actor
from circus.auth.visibility import hidden_project_ids, only_visible
from circus.common.counting import EXACT_UP_TO
from circus.common.enums import ACTIVE_STEP_STATES, BuildStatus, EvaluationStatus, StepState
from circus.common.heartbeat import STALE_AFTER, freshness
from circus.common.models import (
    Build,
    BuildConstituent,
    BuildDependency,
    BuilderSession,
    BuildMetric,
    BuildProduct,
    BuildStatusTotal,
    BuildStep,
    Channel,
    Evaluation,
    EvaluationBuild,
    Jobset,
    News,
    Project,
    ProjectMember,
    RemoteBuilder,
    ServiceHeartbeat,
    Step,
    User,
)
from circus.common.models.base import utcnow
from circus.server.api.queries import completions, loaded_build_counts

# ---------------------------------------------------------------------------
# builds in lists


#: what a list of builds shows of each (rows, not entities: a page of 100 entities cost
#: 3 ms of ORM bookkeeping for columns nobody shows)
LISTED_BUILD_COLUMNS = (Build.id, Build.evaluation_id, Build.job_name, Build.system,
                        Build.status, Build.created_at, Build.started_at, Build.completed_at)


@dataclass
class ListedBuild:
    #: a row of ``LISTED_BUILD_COLUMNS`` (and the names)
    build: Any
    project: str
    jobset: str


def build_list(*where: Any) -> Any:
    """Builds (``LISTED_BUILD_COLUMNS``) with their project and jobset names."""
    return (select(*LISTED_BUILD_COLUMNS, Project.name.label("project_name"),
                   Jobset.name.label("jobset_name"))
            .join(Project, Project.id == Build.project_id)
            .join(Jobset, Jobset.id == Build.jobset_id)
            .where(*where))


def listed(rows: Iterable[Any]) -> list[ListedBuild]:
    return [ListedBuild(row, row.project_name, row.jobset_name) for row in rows]


def _visible(actor: Actor) -> list[Any]:
    """Conditions hiding the rows of projects hidden from ``actor``."""
    hidden = hidden_project_ids(actor)
    return [] if hidden is None else [Project.id.not_in(hidden)]


def recent_finished(session: Session, limit: int, *, actor: Actor) -> list[ListedBuild]:
    query = build_list(Build.completed_at.is_not(None), Build.status.not_in(
        [BuildStatus.pending, BuildStatus.running]), *_visible(actor)).order_by(
        Build.completed_at.desc(), Build.id.desc()).limit(limit)
    return listed(session.execute(query))


def running_builds(session: Session, limit: int, *, actor: Actor) -> list[ListedBuild]:
    query = build_list(Build.status == BuildStatus.running, *_visible(actor)).order_by(
        Build.started_at.desc().nulls_last(), Build.id.desc()).limit(limit)
    return listed(session.execute(query))


# ---------------------------------------------------------------------------
# evaluations in lists


@dataclass
class ListedEvaluation:
    evaluation: Evaluation
    project: str
    jobset: str
    counts: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def count(self, *names: str) -> int:
        return sum(self.counts.get(name, 0) for name in names)

    @property
    def failed(self) -> int:
        return self.total - self.count("succeeded", "pending", "running", "cancelled")

    @cached_property
    def summary(self) -> dict[str, int]:
        """The figures a list shows, computed once (the template asked for each twice)."""
        shown = {name: self.counts.get(name, 0)
                 for name in ("succeeded", "pending", "running", "cancelled")}
        total = sum(self.counts.values())
        return {**shown, "failed": total - sum(shown.values()), "total": total}


def evaluation_list(*where: Any) -> Any:
    return (select(Evaluation, Project.name, Jobset.name)
            .join(Jobset, Jobset.id == Evaluation.jobset_id)
            .join(Project, Project.id == Jobset.project_id)
            .where(*where))


def evaluations_counted(session: Session, jobset_id: int) -> int | None:
    """A jobset's evaluations, counted in its index up to the bound of every list
    (``None`` beyond: then the list's own count takes the planner's estimate). One
    statement where the general count explained the query first."""
    counted = int(session.scalar(select(func.count()).select_from(
        select(Evaluation.id).where(Evaluation.jobset_id == jobset_id)
        .limit(EXACT_UP_TO + 1).subquery())) or 0)
    return counted if counted <= EXACT_UP_TO else None


def with_counts(session: Session, rows: Sequence[Any]) -> list[ListedEvaluation]:
    counts = loaded_build_counts(session, (row[0] for row in rows))
    return [ListedEvaluation(evaluation, project, jobset, counts.get(evaluation.id, {}))
            for evaluation, project, jobset in rows]


def recent_evaluations(session: Session, limit: int, *, actor: Actor
                       ) -> list[ListedEvaluation]:
    rows = session.execute(evaluation_list(*_visible(actor))
                           .order_by(Evaluation.id.desc()).limit(limit)).all()
    return with_counts(session, rows)


# ---------------------------------------------------------------------------
# home


def queue_summary(session: Session, actor: Actor) -> dict[str, Any]:
    """Queued and running builds ``actor`` may see (from the rollup the builds' triggers
    keep, a few rows per jobset) and unfinished steps of all projects by state (a step is
    shared by every build that needs it: the builders' load, named by nobody), in one
    statement (each a round trip less)."""
    def builds(status: BuildStatus) -> Any:
        return only_visible(select(func.coalesce(func.sum(BuildStatusTotal.builds), 0))
                            .where(BuildStatusTotal.status == status),
                            BuildStatusTotal.project_id, actor).scalar_subquery()

    def steps(state: StepState) -> Any:
        # one state's range of the state index
        return select(func.count()).select_from(Step).where(Step.state == state) \
            .scalar_subquery()

    pending, running, *counts = session.execute(select(
        builds(BuildStatus.pending), builds(BuildStatus.running),
        *(steps(state) for state in ACTIVE_STEP_STATES))).one()
    by_state = dict(zip(ACTIVE_STEP_STATES, counts, strict=True))
    return {"pending": int(pending), "running": int(running),
            "steps": {state.value: int(by_state.get(state, 0)) for state in StepState
                      if state is not StepState.done}}


def machine_summary(session: Session) -> dict[str, Any]:
    connected = BuilderSession.connected.is_(True)
    agents, agent_jobs, agent_slots, builders, enabled = session.execute(select(
        func.count().filter(connected),
        func.coalesce(func.sum(BuilderSession.current_jobs).filter(connected), 0),
        func.coalesce(func.sum(BuilderSession.max_jobs).filter(connected), 0),
        select(func.count()).select_from(RemoteBuilder).scalar_subquery(),
        select(func.count()).select_from(RemoteBuilder).where(RemoteBuilder.enabled.is_(True))
        .scalar_subquery()).select_from(BuilderSession)).one()
    return {"agents": agents, "agent_jobs": agent_jobs, "agent_slots": agent_slots,
            "builders": builders, "builders_enabled": enabled,
            "daemons": freshness(session)}


def latest_news(session: Session, limit: int) -> list[News]:
    return list(session.scalars(select(News).order_by(News.id.desc()).limit(limit)))


# ---------------------------------------------------------------------------
# projects


def project_overview(session: Session, project_ids: list[int]) -> dict[int, dict[str, Any]]:
    """Per project: jobset count and time of the newest evaluation (two queries)."""
    out: dict[int, dict[str, Any]] = {pid: {"jobsets": 0, "last_evaluation": None}
                                      for pid in project_ids}
    if not project_ids:
        return out
    for pid, count in session.execute(
            select(Jobset.project_id, func.count()).where(Jobset.project_id.in_(project_ids))
            .group_by(Jobset.project_id)):
        out[pid]["jobsets"] = count
    for pid, last in session.execute(
            select(Jobset.project_id, func.max(Evaluation.created_at))
            .join(Evaluation, Evaluation.jobset_id == Jobset.id)
            .where(Jobset.project_id.in_(project_ids)).group_by(Jobset.project_id)):
        out[pid]["last_evaluation"] = last
    return out


def latest_evaluations(session: Session, jobset_ids: list[int]) -> dict[int, Evaluation]:
    """The newest evaluation of each jobset (one DISTINCT ON query)."""
    if not jobset_ids:
        return {}
    rows = session.scalars(
        select(Evaluation).where(Evaluation.jobset_id.in_(jobset_ids))
        .distinct(Evaluation.jobset_id).order_by(Evaluation.jobset_id, Evaluation.id.desc()))
    return {row.jobset_id: row for row in rows}


@dataclass
class ListedChannel:
    channel: Channel
    project: str
    jobset: str
    evaluation: Evaluation | None


def channel_list(session: Session, project_id: int | None = None,
                 jobset_id: int | None = None, *, actor: Actor | None = None
                 ) -> list[ListedChannel]:
    """Channels (of a project or jobset), without those of projects hidden from ``actor``
    (callers showing one project's channels have checked its visibility already)."""
    query = (select(Channel, Project.name, Jobset.name, Evaluation)
             .join(Project, Project.id == Channel.project_id)
             .join(Jobset, Jobset.id == Channel.jobset_id)
             .outerjoin(Evaluation, Evaluation.id == Channel.evaluation_id)
             .order_by(Channel.name))
    if project_id is not None:
        query = query.where(Channel.project_id == project_id)
    if jobset_id is not None:
        query = query.where(Channel.jobset_id == jobset_id)
    if actor is not None:
        query = query.where(*_visible(actor))
    return [ListedChannel(*row) for row in session.execute(query)]


def members(session: Session, project_id: int) -> list[tuple[User, ProjectMember]]:
    return [(user, member) for user, member in session.execute(
        select(User, ProjectMember).join(ProjectMember, ProjectMember.user_id == User.id)
        .where(ProjectMember.project_id == project_id).order_by(User.username))]


# ---------------------------------------------------------------------------
# jobsets: the matrix of jobs by evaluations


@dataclass
class Matrix:
    evaluations: list[Evaluation]
    jobs: list[str]
    total_jobs: int
    #: (job, evaluation id) → (build id, status)
    cells: dict[tuple[str, int], tuple[int, BuildStatus]]


def job_matrix(session: Session, jobset_id: int, evaluations: list[Evaluation], *,
               job_filter: str, offset: int, limit: int) -> Matrix:
    """A page of jobs (those of the newest completed evaluation shown, by name) by the
    given evaluations: three cheap queries even for 50,000 jobs."""
    if not evaluations:
        return Matrix([], [], 0, {})
    completed = [e for e in evaluations if e.status is EvaluationStatus.completed]
    rows_of = (completed or evaluations)[-1].id
    # an evaluation's builds are its jobset's (it reuses only the jobset's own): walking
    # the jobset's (jobset_id, job_name) index in name order and probing the membership
    # stops after a page, where joining the members sorted all of their builds
    names = select(Build.job_name).where(Build.jobset_id == jobset_id, select(
        EvaluationBuild.build_id).where(EvaluationBuild.evaluation_id == rows_of,
                                        EvaluationBuild.build_id == Build.id).exists())
    if job_filter:
        # every name is matched to count them anyway: the page and the count in one pass.
        # strpos of the lowered texts is ILIKE '%q%' in a UTF-8 database (which lowers both
        # too), with nothing to escape, at half its cost (5,000 names: 1.9 -> 0.5 ms)
        names = names.where(func.strpos(func.lower(Build.job_name),
                                        func.lower(literal(job_filter))) > 0)
        page = session.execute(names.add_columns(func.count().over()).order_by(Build.job_name)
                               .offset(offset).limit(limit)).all()
        jobs = [job for job, _ in page]
        total = page[0][1] if page else int(session.scalar(
            select(func.count()).select_from(names.subquery())) or 0) if offset else 0
    else:
        # one build per job: the members, counted in the membership index alone (an
        # init plan of the page's statement; on its own only past the last page)
        members = select(func.count()).select_from(EvaluationBuild).where(
            EvaluationBuild.evaluation_id == rows_of)
        page = session.execute(names.add_columns(members.scalar_subquery())
                               .order_by(Build.job_name).offset(offset).limit(limit)).all()
        jobs = [job for job, _ in page]
        total = int(page[0][1] if page else session.scalar(members) or 0)
    cells: dict[tuple[str, int], tuple[int, BuildStatus]] = {}
    if jobs:
        # the jobset's (jobset_id, job_name) index finds the few builds of these jobs, then
        # the membership index of the evaluations shown is read alone for them: joined in
        # one statement, the plan fetched and hashed every membership row of those
        # evaluations (20,000 for 10 evaluations of 2,000 jobs: 4.5 ms, now ~2 ms)
        builds = {build_id: (job, status) for build_id, job, status in session.execute(
            select(Build.id, Build.job_name, Build.status)
            .where(Build.jobset_id == jobset_id, Build.job_name.in_(jobs)))}
        if builds:
            for eid, build_id in session.execute(
                    select(EvaluationBuild.evaluation_id, EvaluationBuild.build_id).where(
                        EvaluationBuild.evaluation_id.in_([e.id for e in evaluations]),
                        EvaluationBuild.build_id.in_(list(builds)))):
                job, status = builds[build_id]
                cells[(job, eid)] = (build_id, status)
    return Matrix(evaluations, jobs, total, cells)


# ---------------------------------------------------------------------------
# evaluations: builds grouped by status

FAILED_STATUSES: list[BuildStatus] = [s for s in BuildStatus if s.is_finished and s not in (
    BuildStatus.succeeded, BuildStatus.cancelled)]
STATUS_GROUPS: dict[str, list[BuildStatus] | None] = {
    "failed": FAILED_STATUSES,
    "queued": [BuildStatus.pending],
    "running": [BuildStatus.running],
    "succeeded": [BuildStatus.succeeded],
    "cancelled": [BuildStatus.cancelled],
    "all": None,
}


def group_counts(counts: dict[str, int]) -> dict[str, int]:
    out = {}
    for group, statuses in STATUS_GROUPS.items():
        out[group] = (sum(counts.values()) if statuses is None
                      else sum(counts.get(s.name, 0) for s in statuses))
    return out


def evaluation_builds(evaluation_id: int, group: str) -> Any:
    query = (select(*LISTED_BUILD_COLUMNS)
             .join(EvaluationBuild, EvaluationBuild.build_id == Build.id)
             .where(EvaluationBuild.evaluation_id == evaluation_id))
    statuses = STATUS_GROUPS.get(group)
    if statuses is not None:
        query = query.where(Build.status.in_(statuses))
    return query.order_by(Build.job_name)


def previous_evaluation_id(session: Session, evaluation: Evaluation) -> int | None:
    return session.scalar(select(func.max(Evaluation.id)).where(
        Evaluation.jobset_id == evaluation.jobset_id, Evaluation.id < evaluation.id))


# ---------------------------------------------------------------------------
# the build page


@dataclass
class BuildPage:
    build: Build
    evaluation: Evaluation
    jobset: Jobset
    project: Project


def build_page(session: Session, build_id: int) -> BuildPage | None:
    row = session.execute(
        select(Build, Evaluation, Jobset, Project)
        .join(Evaluation, Evaluation.id == Build.evaluation_id)
        .join(Jobset, Jobset.id == Build.jobset_id)
        .join(Project, Project.id == Build.project_id)
        .where(Build.id == build_id)).first()
    return BuildPage(*row) if row is not None else None


def products(session: Session, build_id: int) -> list[BuildProduct]:
    return list(session.scalars(select(BuildProduct).where(BuildProduct.build_id == build_id)
                                .order_by(BuildProduct.id)))


def metrics(session: Session, build_id: int) -> list[BuildMetric]:
    return list(session.scalars(select(BuildMetric).where(BuildMetric.build_id == build_id)
                                .order_by(BuildMetric.name)))


def related_builds(session: Session, build_id: int, relation: str, limit: int = 200
                   ) -> list[Build]:
    """Constituents, dependencies or dependents of a build (one query)."""
    ids: Any
    if relation == "constituents":
        ids = select(BuildConstituent.constituent_id).where(
            BuildConstituent.aggregate_id == build_id)
    elif relation == "dependencies":
        ids = select(BuildDependency.dependency_id).where(BuildDependency.build_id == build_id)
    else:
        ids = select(BuildDependency.build_id).where(BuildDependency.dependency_id == build_id)
    return list(session.scalars(select(Build).options(lazyload(Build.outputs))
                                .where(Build.id.in_(ids)).order_by(Build.job_name)
                                .limit(limit)))


def steps_by_id(session: Session, step_ids: set[int]) -> dict[int, Step]:
    if not step_ids:
        return {}
    return {s.id: s for s in session.scalars(select(Step).where(Step.id.in_(step_ids)))}


def log_step(session: Session, build_id: int, step_id: int | None = None) -> Step | None:
    """The step whose log to show: the one asked for, else the step the build is running
    now (its own derivation first), else its own derivation's step."""
    query = (select(Step).join(BuildStep, BuildStep.step_id == Step.id)
             .where(BuildStep.build_id == build_id))
    if step_id is not None:
        return session.scalar(query.where(Step.id == step_id))
    return session.scalar(query.order_by(
        (Step.state == StepState.running).desc(), BuildStep.is_toplevel.desc(),
        BuildStep.step_nr.desc()).limit(1))


# ---------------------------------------------------------------------------
# queue and machines


@dataclass
class QueueClass:
    name: str
    pending: int = 0
    queued: int = 0
    running: int = 0


def queue_classes(session: Session) -> list[QueueClass]:
    classes: dict[str, QueueClass] = {}
    for name, state, count in session.execute(
            select(Step.queue_class, Step.state, func.count())
            .where(Step.state.in_(ACTIVE_STEP_STATES)).group_by(Step.queue_class, Step.state)):
        setattr(classes.setdefault(name, QueueClass(name)), state.value, count)
    return sorted(classes.values(), key=lambda c: c.name)


@dataclass
class ListedStep:
    step: Step
    build_id: int | None
    job_name: str | None
    project: str | None
    jobset: str | None
    waiting_builds: int


def steps_list(session: Session, state: StepState, limit: int, actor: Actor
               ) -> list[ListedStep]:
    """Active steps of one state that builds ``actor`` may see wait for, each with one
    such build and their number (two queries). A step only hidden projects need is
    left out: its derivation's name tells their jobs."""
    hidden = hidden_project_ids(actor)

    def of_builds(column: Any) -> Any:
        query = select(column).select_from(BuildStep).where(BuildStep.step_id == Step.id)
        if hidden is not None:
            query = query.join(Build, Build.id == BuildStep.build_id).where(
                Build.project_id.not_in(hidden))
        return query.correlate(Step).scalar_subquery()

    first_build = of_builds(func.min(BuildStep.build_id))
    waiting = of_builds(func.count())
    order = ([Step.started_at.desc().nulls_last(), Step.id] if state is StepState.running
             else [Step.priority.desc(), Step.id])
    query = select(Step, first_build, waiting).where(Step.state == state)
    if hidden is not None:
        query = query.where(first_build.is_not(None))
    rows = session.execute(query.order_by(*order).limit(limit)).all()
    ids = {build_id for _, build_id, _ in rows if build_id is not None}
    builds: dict[int, tuple[str, str, str]] = {}
    if ids:
        builds = {bid: (job, project, jobset) for bid, job, project, jobset in session.execute(
            select(Build.id, Build.job_name, Project.name, Jobset.name)
            .join(Project, Project.id == Build.project_id)
            .join(Jobset, Jobset.id == Build.jobset_id).where(Build.id.in_(ids)))}
    out = []
    for step, build_id, count in rows:
        job, project, jobset = builds.get(build_id, (None, None, None))
        out.append(ListedStep(step, build_id, job, project, jobset, count))
    return out


def pending_builds_by_system(session: Session, actor: Actor) -> list[tuple[str, int, int]]:
    """(system, pending, running) builds ``actor`` may see."""
    table: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for system, status, count in session.execute(
            only_visible(select(BuildStatusTotal.system, BuildStatusTotal.status,
                                func.sum(BuildStatusTotal.builds))
                         .where(BuildStatusTotal.status.in_([BuildStatus.pending,
                                                             BuildStatus.running])),
                         BuildStatusTotal.project_id, actor)
            .group_by(BuildStatusTotal.system, BuildStatusTotal.status)
            .having(func.sum(BuildStatusTotal.builds) != 0)):
        table[system][0 if status is BuildStatus.pending else 1] += int(count)
    return [(system, pending, running) for system, (pending, running) in sorted(table.items())]


def running_by_machine(session: Session) -> dict[str, int]:
    return {machine or worker or "?": count for machine, worker, count in session.execute(
        select(Step.machine, Step.worker, func.count()).where(Step.state == StepState.running)
        .group_by(Step.machine, Step.worker))}


@dataclass
class Daemon:
    row: ServiceHeartbeat
    fresh: bool
    age_seconds: float

    @property
    def capabilities(self) -> list[dict[str, Any]]:
        """Local build workers of a queue runner, as its heartbeat describes them."""
        found = self.row.details.get("capabilities") if isinstance(self.row.details, dict) \
            else None
        return [c for c in found if isinstance(c, dict)] if isinstance(found, list) else []


def daemons(session: Session) -> list[Daemon]:
    now = utcnow()
    return [Daemon(row, now - row.last_heartbeat < STALE_AFTER,
                   (now - row.last_heartbeat).total_seconds())
            for row in session.scalars(select(ServiceHeartbeat).order_by(
                ServiceHeartbeat.kind, ServiceHeartbeat.service))]


def remote_builders(session: Session) -> list[RemoteBuilder]:
    return list(session.scalars(select(RemoteBuilder).order_by(RemoteBuilder.name)))


def agent_sessions(session: Session, limit: int) -> list[BuilderSession]:
    """Connected agents first, then the most recently seen (disconnected kept for history)."""
    return list(session.scalars(
        select(BuilderSession).order_by(BuilderSession.connected.desc(),
                                        BuilderSession.last_seen.desc().nulls_last(),
                                        BuilderSession.name).limit(limit)))


# ---------------------------------------------------------------------------
# metrics


def status_totals(session: Session, actor: Actor) -> dict[str, int]:
    # from the rollup the builds' triggers keep, not the builds
    return {status.name: int(count) for status, count in session.execute(
        only_visible(select(BuildStatusTotal.status, func.sum(BuildStatusTotal.builds)),
                     BuildStatusTotal.project_id, actor)
        .group_by(BuildStatusTotal.status)) if count}


def average_duration(session: Session, since: datetime, actor: Actor) -> float | None:
    finished = completions(since, {}, actor)
    seconds, durations = session.execute(
        select(func.sum(finished.c.duration_sum), func.sum(finished.c.durations))).one()
    return float(seconds / durations) if durations else None


def daily_finished(session: Session, days: int, actor: Actor
                   ) -> list[tuple[datetime, int, int]]:
    """(day, succeeded, failed) finished builds ``actor`` may see for each of the last
    ``days`` days (UTC), oldest first, quiet days included."""
    today = utcnow().replace(hour=0, minute=0, second=0, microsecond=0)
    first = today - timedelta(days=days - 1)
    finished = completions(first, {}, actor)
    day = func.date_trunc("day", func.timezone("UTC", finished.c.t))
    counts = {d.date(): (int(ok or 0), int(failed or 0)) for d, ok, failed in session.execute(
        select(day, func.sum(finished.c.builds).filter(
                   finished.c.status == BuildStatus.succeeded),
               func.sum(finished.c.builds).filter(and_(
                   finished.c.status != BuildStatus.succeeded,
                   finished.c.status != BuildStatus.cancelled)))
        .group_by(day))}
    out = []
    for offset in range(days):
        moment = first + timedelta(days=offset)
        ok, failed = counts.get(moment.date(), (0, 0))
        out.append((moment, ok, failed))
    return out
