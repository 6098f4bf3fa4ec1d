"""``GET /metrics``: Prometheus metrics.

HTTP request metrics come from prometheus-flask-exporter; a custom collector
reads the rest from PostgreSQL at scrape time (queue depth per class, steps by
state, builds by status, connected agents, notification backlog, evaluations
and their durations, the binary cache's counts), so every server process
reports the same numbers, including what other daemons did (the evaluator
stores each evaluation's duration on its row). Each app gets its own registry
(tests create many apps in one process).

Who may scrape: the figures cover the whole installation (hidden projects' builds
and evaluations included) and name the agents' hosts, so ``/metrics`` answers a
bearer token whose digest is in ``server.metrics_tokens`` (a scraper's credential,
good for nothing else) or a caller who may view the ``prometheus`` page
(``server.page_access``: admins by default; ``public`` opens it to everyone).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime

from flask import Flask
from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_flask_exporter import PrometheusMetrics
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from circus.common.enums import (
    ACTIVE_STEP_STATES,
    BuildStatus,
    EvaluationStatus,
    NotificationTaskStatus,
    StepState,
)
from circus.common.errors import PermissionDenied, Unauthenticated
from circus.common.models import (
    BuilderSession,
    BuildStatusTotal,
    Evaluation,
    NotificationTask,
    PendingPostprocessing,
    ServiceHeartbeat,
    Step,
)
from circus.common.tokens import token_accepted
from circus.server.auth import bearer_token, current_actor
from circus.server.context import server_context, settings
from circus.server.counters import (
    CACHE_BYTES,
    CACHE_ERRORS,
    CACHE_REQUESTS,
    Tally,
    read_counters,
    tally,
)
from circus.server.dashboard.access import may_view

#: upper bounds (seconds) of the evaluation duration buckets: a small flake takes
#: seconds, nixpkgs-sized jobsets tens of minutes
EVALUATION_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)


@dataclass
class Families:
    """What one scrape reports (built anew each time: a family keeps its samples)."""

    depth: GaugeMetricFamily = field(default_factory=lambda: GaugeMetricFamily(
        "circus_queue_depth", "Runnable (queued) steps per queue class", labels=["queue"]))
    steps: GaugeMetricFamily = field(default_factory=lambda: GaugeMetricFamily(
        "circus_steps", "Unfinished steps by state", labels=["state"]))
    builds: GaugeMetricFamily = field(default_factory=lambda: GaugeMetricFamily(
        "circus_builds", "Builds by status", labels=["status"]))
    backlog: GaugeMetricFamily = field(default_factory=lambda: GaugeMetricFamily(
        "circus_notification_backlog", "Notification tasks not yet completed",
        labels=["status"]))
    postprocessing: GaugeMetricFamily = field(default_factory=lambda: GaugeMetricFamily(
        "circus_postprocessing_pending", "Succeeded builds whose cache publish and closure "
        "size are still to do: waiting for the first try, or retrying after a failure",
        labels=["state"]))
    agents: GaugeMetricFamily = field(default_factory=lambda: GaugeMetricFamily(
        "circus_agents_connected", "Connected agents"))
    agent_jobs: GaugeMetricFamily = field(default_factory=lambda: GaugeMetricFamily(
        "circus_agent_jobs", "Jobs running on agents"))
    agent_current_jobs: GaugeMetricFamily = field(default_factory=lambda: GaugeMetricFamily(
        "circus_agent_current_jobs", "Jobs running on a connected agent", labels=["agent"]))
    agent_load: GaugeMetricFamily = field(default_factory=lambda: GaugeMetricFamily(
        "circus_agent_load1", "1-minute load average of an agent", labels=["agent"]))
    agent_psi: GaugeMetricFamily = field(default_factory=lambda: GaugeMetricFamily(
        "circus_agent_pressure_avg10", "PSI avg10 of an agent", labels=["agent", "resource"]))
    agent_builds: GaugeMetricFamily = field(default_factory=lambda: GaugeMetricFamily(
        "circus_agent_builds", "Steps an agent finished, by result",
        labels=["agent", "result"]))
    evaluations: CounterMetricFamily = field(default_factory=lambda: CounterMetricFamily(
        "circus_evaluations", "Evaluations by status", labels=["status"]))
    evaluation_duration: HistogramMetricFamily = field(
        default_factory=lambda: HistogramMetricFamily(
            "circus_evaluation_duration_seconds", "Duration of finished evaluations"))
    cache_requests: CounterMetricFamily = field(default_factory=lambda: CounterMetricFamily(
        "circus_cache_requests", "Binary cache requests by kind and result (hit, miss)",
        labels=["kind", "result"]))
    cache_bytes: CounterMetricFamily = field(default_factory=lambda: CounterMetricFamily(
        "circus_cache_served_bytes", "Bytes the binary cache sent, by kind",
        labels=["kind"]))
    cache_errors: CounterMetricFamily = field(default_factory=lambda: CounterMetricFamily(
        "circus_cache_errors", "Binary cache requests that failed on the server's side "
        "(a recorded NAR missing, S3 unreachable)", labels=["reason"]))

    heartbeat_age: GaugeMetricFamily = field(default_factory=lambda: GaugeMetricFamily(
        "circus_daemon_heartbeat_age_seconds",
        "Seconds since a daemon's last heartbeat (evaluator, queue runner, ...)",
        labels=["service", "kind"]))

    def all(self) -> list[Metric]:
        return [getattr(self, f.name) for f in fields(self)]


class DatabaseCollector(Collector):
    def __init__(self, factory: Callable[[], sessionmaker[Session]],
                 counts: Callable[[], Tally]) -> None:
        self.factory = factory
        self.counts = counts

    def describe(self) -> Iterator[Metric]:
        # Registering a collector describes it (without describe(): collects it). No
        # query may run then: it would open a pooled connection in gunicorn's master,
        # and every forked worker would share that socket.
        yield from Families().all()

    def collect(self) -> Iterator[Metric]:
        families = Families()
        # this process's own pending counts first, so a scrape sees them at once
        self.counts().flush()
        try:
            with self.factory()() as session:
                self._queue(session, families)
                self._agents(session, families)
                self._evaluations(session, families)
                self._cache(session, families)
                self._heartbeats(session, families)
        except Exception:
            return
        yield from families.all()

    @staticmethod
    def _queue(session: Session, families: Families) -> None:
        for queue, count in session.execute(
                select(Step.queue_class, func.count())
                .where(Step.state == StepState.queued).group_by(Step.queue_class)):
            families.depth.add_metric([queue], count)
        counts = dict(session.execute(
            select(Step.state, func.count()).where(Step.state.in_(ACTIVE_STEP_STATES))
            .group_by(Step.state)).tuples().all())
        for state in (StepState.pending, StepState.queued, StepState.running):
            families.steps.add_metric([state.value], counts.get(state, 0))
        # from the rollup the builds' triggers keep: a scrape must not scan the builds
        by_status = {status: int(count) for status, count in session.execute(
            select(BuildStatusTotal.status, func.sum(BuildStatusTotal.builds))
            .group_by(BuildStatusTotal.status))}
        for status in BuildStatus:
            families.builds.add_metric([status.name], by_status.get(status, 0))
        backlog = dict(session.execute(
            select(NotificationTask.status, func.count())
            .where(NotificationTask.status != NotificationTaskStatus.completed)
            .group_by(NotificationTask.status)).tuples().all())
        for task_status in NotificationTaskStatus:
            if task_status != NotificationTaskStatus.completed:
                families.backlog.add_metric([task_status.value], backlog.get(task_status, 0))
        retrying = PendingPostprocessing.attempts > 0
        waiting, retried = session.execute(select(
            func.count().filter(~retrying), func.count().filter(retrying))).one()
        families.postprocessing.add_metric(["waiting"], waiting)
        families.postprocessing.add_metric(["retrying"], retried)

    @staticmethod
    def _agents(session: Session, families: Families) -> None:
        connected = session.execute(
            select(func.count(), func.coalesce(func.sum(BuilderSession.current_jobs), 0))
            .where(BuilderSession.connected.is_(True))).one()
        families.agents.add_metric([], connected[0])
        families.agent_jobs.add_metric([], connected[1])
        for agent in session.scalars(select(BuilderSession)
                                     .where(BuilderSession.connected.is_(True))):
            families.agent_current_jobs.add_metric([agent.name], agent.current_jobs)
            families.agent_load.add_metric([agent.name], agent.load1 or 0.0)
            for resource in ("cpu", "mem", "io"):
                value = getattr(agent, f"{resource}_psi_avg10")
                if value is not None:
                    families.agent_psi.add_metric([agent.name, resource], value)
            families.agent_builds.add_metric([agent.name, "succeeded"],
                                             agent.builds_succeeded)
            families.agent_builds.add_metric([agent.name, "failed"], agent.builds_failed)

    @staticmethod
    def _evaluations(session: Session, families: Families) -> None:
        by_status = dict(session.execute(
            select(Evaluation.status, func.count()).group_by(Evaluation.status)).tuples().all())
        for status in EvaluationStatus:
            families.evaluations.add_metric([status.value], by_status.get(status, 0))
        # cumulative buckets in one scan (eval_time is written when an evaluation ends)
        timed = Evaluation.eval_time.is_not(None)
        columns = [func.count().filter(Evaluation.eval_time <= bound)
                   for bound in EVALUATION_BUCKETS]
        row = session.execute(select(func.count().filter(timed),
                                     func.coalesce(func.sum(Evaluation.eval_time), 0.0),
                                     *columns)).one()
        total, seconds, *within = row
        buckets = [(repr(bound), count) for bound, count in zip(EVALUATION_BUCKETS, within,
                                                                strict=True)]
        families.evaluation_duration.add_metric([], [*buckets, ("+Inf", total)], seconds)

    @staticmethod
    def _heartbeats(session: Session, families: Families) -> None:
        # the evaluator and the queue runner have no endpoint Prometheus scrapes: their
        # heartbeats say whether they run (an alert on the age, not on `up`)
        now = datetime.now(UTC)
        for beat in session.scalars(select(ServiceHeartbeat)):
            families.heartbeat_age.add_metric(
                [beat.service, beat.kind], (now - beat.last_heartbeat).total_seconds())

    @staticmethod
    def _cache(session: Session, families: Families) -> None:
        for name, value in read_counters(session, CACHE_REQUESTS).items():
            kind, _, result = name.removeprefix(CACHE_REQUESTS).partition(":")
            families.cache_requests.add_metric([kind, result], value)
        for name, value in read_counters(session, CACHE_BYTES).items():
            families.cache_bytes.add_metric([name.removeprefix(CACHE_BYTES)], value)
        for name, value in read_counters(session, CACHE_ERRORS).items():
            families.cache_errors.add_metric([name.removeprefix(CACHE_ERRORS)], value)


#: the page of ``server.page_access`` that opens ``/metrics`` to users and API keys
SCRAPE_PAGE = "prometheus"


def require_scraper() -> None:
    """401/403 unless the caller may read ``/metrics`` (see the module doc)."""
    token = bearer_token()
    if token is not None and token_accepted(token, settings().server.metrics_tokens):
        return
    actor = current_actor()
    if may_view(actor, SCRAPE_PAGE):
        return
    if not actor.is_authenticated:
        raise Unauthenticated("authentication required to read metrics", {
            "hint": "send Authorization: Bearer <token> with a token whose SHA-256 digest "
                    "is in server.metrics_tokens, or an admin's API key"})
    raise PermissionDenied(f"{actor.label} may not read metrics",
                           {"page": SCRAPE_PAGE, "role": actor.role and actor.role.value})


def scrapers_only(view: Callable[..., object]) -> Callable[..., object]:
    @functools.wraps(view)
    def guarded(*args: object, **kwargs: object) -> object:
        require_scraper()
        return view(*args, **kwargs)

    return guarded


def init_app(app: Flask) -> PrometheusMetrics:
    registry = CollectorRegistry(auto_describe=True)
    registry.register(DatabaseCollector(lambda: server_context(app).session_factory,
                                        lambda: tally(app)))
    metrics = PrometheusMetrics(app, registry=registry, path="/metrics",
                                group_by="url_rule", defaults_prefix="circus",
                                metrics_decorator=scrapers_only)
    return metrics
