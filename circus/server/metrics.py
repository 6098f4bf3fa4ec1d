"""``GET /metrics``: Prometheus metrics.

HTTP request metrics come from prometheus-flask-exporter; a custom collector
reads the queue state from PostgreSQL at scrape time (queue depth per class,
steps by state, builds by status, connected agents, notification backlog), so
every server process reports the same numbers. Each app gets its own registry
(tests create many apps in one process).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from flask import Flask
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from prometheus_flask_exporter import PrometheusMetrics
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from circus.common.enums import BuildStatus, NotificationTaskStatus, StepState
from circus.common.models import Build, BuilderSession, NotificationTask, Step
from circus.server.context import server_context


class QueueCollector(Collector):
    def __init__(self, factory: Callable[[], sessionmaker[Session]]) -> None:
        self.factory = factory

    def _families(self) -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily,
                                 GaugeMetricFamily, GaugeMetricFamily,
                                 dict[str, GaugeMetricFamily], GaugeMetricFamily]:
        depth = GaugeMetricFamily("circus_queue_depth",
                                  "Runnable (queued) steps per queue class", labels=["queue"])
        steps = GaugeMetricFamily("circus_steps", "Unfinished steps by state", labels=["state"])
        builds = GaugeMetricFamily("circus_builds", "Builds by status", labels=["status"])
        agents = GaugeMetricFamily("circus_agents_connected", "Connected agents")
        agent_jobs = GaugeMetricFamily("circus_agent_jobs", "Jobs running on agents")
        per_agent = {
            "jobs": GaugeMetricFamily("circus_agent_current_jobs",
                                      "Jobs running on a connected agent", labels=["agent"]),
            "load": GaugeMetricFamily("circus_agent_load1", "1-minute load average of an agent",
                                      labels=["agent"]),
            "psi": GaugeMetricFamily("circus_agent_pressure_avg10",
                                     "PSI avg10 of an agent", labels=["agent", "resource"]),
            "builds": GaugeMetricFamily("circus_agent_builds",
                                        "Steps an agent finished, by result",
                                        labels=["agent", "result"]),
        }
        backlog = GaugeMetricFamily("circus_notification_backlog",
                                    "Notification tasks not yet completed", labels=["status"])
        return depth, steps, builds, agents, agent_jobs, per_agent, backlog

    def describe(self) -> Iterator[GaugeMetricFamily]:
        # Registering a collector describes it (without describe(): collects it). No
        # query may run then: it would open a pooled connection in gunicorn's master,
        # and every forked worker would share that socket.
        depth, steps, builds, agents, agent_jobs, per_agent, backlog = self._families()
        yield from (depth, steps, builds, agents, agent_jobs, *per_agent.values(), backlog)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depth, steps, builds, agents, agent_jobs, per_agent, backlog = self._families()
        try:
            with self.factory()() as session:
                for queue, count in session.execute(
                        select(Step.queue_class, func.count())
                        .where(Step.state == StepState.queued).group_by(Step.queue_class)):
                    depth.add_metric([queue], count)
                counts = dict(session.execute(
                    select(Step.state, func.count()).where(Step.state != StepState.done)
                    .group_by(Step.state)).tuples().all())
                for state in (StepState.pending, StepState.queued, StepState.running):
                    steps.add_metric([state.value], counts.get(state, 0))
                by_status = dict(session.execute(
                    select(Build.status, func.count()).group_by(Build.status)).tuples().all())
                for status in BuildStatus:
                    builds.add_metric([status.name], by_status.get(status, 0))
                connected = session.execute(
                    select(func.count(), func.coalesce(func.sum(BuilderSession.current_jobs), 0))
                    .where(BuilderSession.connected.is_(True))).one()
                agents.add_metric([], connected[0])
                agent_jobs.add_metric([], connected[1])
                for agent in session.scalars(select(BuilderSession)
                                             .where(BuilderSession.connected.is_(True))):
                    per_agent["jobs"].add_metric([agent.name], agent.current_jobs)
                    per_agent["load"].add_metric([agent.name], agent.load1 or 0.0)
                    for resource in ("cpu", "mem", "io"):
                        value = getattr(agent, f"{resource}_psi_avg10")
                        if value is not None:
                            per_agent["psi"].add_metric([agent.name, resource], value)
                    per_agent["builds"].add_metric([agent.name, "succeeded"],
                                                   agent.builds_succeeded)
                    per_agent["builds"].add_metric([agent.name, "failed"], agent.builds_failed)
                for task_status, count in session.execute(
                        select(NotificationTask.status, func.count())
                        .where(NotificationTask.status != NotificationTaskStatus.completed)
                        .group_by(NotificationTask.status)):
                    backlog.add_metric([task_status.value], count)
        except Exception:
            return
        yield from (depth, steps, builds, agents, agent_jobs, *per_agent.values(), backlog)


def init_app(app: Flask) -> PrometheusMetrics:
    registry = CollectorRegistry(auto_describe=True)
    registry.register(QueueCollector(lambda: server_context(app).session_factory))
    metrics = PrometheusMetrics(app, registry=registry, path="/metrics",
                                group_by="url_rule", defaults_prefix="circus")
    return metrics
