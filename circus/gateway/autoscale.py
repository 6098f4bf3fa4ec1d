"""GitHub Actions autoscaling (``queue_runner.ephemeral_pools``).

Every few seconds, per pool: *demand* is the number of queued steps a pool
agent could take — its systems and features serve the step's class, a branch
evaluation (never a pull request) of a project of the pool's repository waits
for it, as the gateway would only give such agents those steps. *Capacity* is
the free slots of the pool's connected agents plus the slots of launches still
in flight (a launch is in flight until an agent whose name starts with the
launch's ``agent_name`` registers, or ``inflight_ttl_secs`` pass). When demand
exceeds capacity, the autoscaler dispatches the pool's workflow
(``POST /repos/{repository}/actions/workflows/{workflow}/dispatches``) once per
missing agent, never above ``max_inflight`` launches in flight and at most once
per ``scale_up_cooldown_secs``. The workflow starts ``circus-agent --ephemeral``
with the inputs (``runner_url``, ``oidc_audience``, ``systems``, ``features``,
``max_jobs``, ``agent_name``); the agent authenticates with the job's OIDC token.

Launches in flight are kept in memory: a restarted queue runner forgets them and
may launch up to ``max_inflight`` agents more than needed, which then idle out
(``max_idle_secs``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from dataclasses import dataclass, field

import requests
from sqlalchemy import text
from sqlalchemy.orm import Session

from circus.common.config import EphemeralPoolSettings, Settings
from circus.gateway.server import Gateway, projects_of_repository
from circus.queue_runner.routing.capabilities import Capabilities
from circus.queue_runner.steps.leases import trusted_condition

log = logging.getLogger(__name__)

ROUND_SECS = 5.0
HTTP_TIMEOUT_SECS = 20.0


@dataclass
class Launch:
    agent_name: str
    at: float


@dataclass
class PoolState:
    inflight: list[Launch] = field(default_factory=list)
    last_launch: float = float("-inf")


def launches_needed(demand: int, free_slots: int, inflight: int, max_jobs: int,
                    max_inflight: int) -> int:
    """How many agents to start now (each brings ``max_jobs`` slots)."""
    missing = demand - free_slots - inflight * max_jobs
    if missing <= 0:
        return 0
    return max(0, min(math.ceil(missing / max_jobs), max_inflight - inflight))


def pool_demand(session: Session, pool: EphemeralPoolSettings) -> int:
    capabilities = Capabilities(frozenset(pool.systems), frozenset(pool.features), frozenset())
    classes = [name for name in session.execute(text("SELECT name FROM queue_classes"))
               .scalars() if capabilities.can_serve(name)]
    projects = projects_of_repository(session, pool.repository)
    if not classes or not projects:
        return 0
    return int(session.execute(text(f"""
        SELECT count(*) FROM steps s
        WHERE s.state = 'queued' AND s.queue_class = ANY(:classes)
          AND (s.not_before IS NULL OR s.not_before <= now()) {trusted_condition(projects)}
    """), {"classes": classes, "projects": projects}).scalar_one())


class Autoscaler:
    def __init__(self, gateway: Gateway, settings: Settings) -> None:
        self.gateway = gateway
        self.pools = list(settings.queue_runner.ephemeral_pools)
        self.state = {pool.name: PoolState() for pool in self.pools}
        gateway.on_agent_change.append(self.forget_arrived)

    def forget_arrived(self) -> None:
        """Launches whose agent registered are no longer in flight."""
        names = [a.facts.name for a in self.gateway.agents.values()]
        for state in self.state.values():
            state.inflight = [launch for launch in state.inflight
                              if not any(n.startswith(launch.agent_name) for n in names)]

    async def run(self) -> None:
        while True:
            try:
                await self.round()
            except Exception:
                log.exception("autoscaling round failed")
            await asyncio.sleep(ROUND_SECS)

    async def round(self) -> dict[str, int]:
        """One look at every pool; returns the launches made per pool."""
        launched: dict[str, int] = {}
        for pool in self.pools:
            launched[pool.name] = await self._scale(pool)
        return launched

    async def _scale(self, pool: EphemeralPoolSettings) -> int:
        state = self.state[pool.name]
        now = time.monotonic()
        self.forget_arrived()
        state.inflight = [launch for launch in state.inflight
                          if now - launch.at < pool.inflight_ttl_secs]
        if now - state.last_launch < pool.scale_up_cooldown_secs:
            return 0
        demand = await self.gateway.db(lambda s: pool_demand(s, pool))
        free = sum(a.free_slots for a in self.gateway.agents.values()
                   if a.facts.pool == pool.name)
        wanted = launches_needed(demand, free, len(state.inflight), pool.max_jobs,
                                 pool.max_inflight)
        if not wanted:
            return 0
        state.last_launch = now
        done = 0
        for _ in range(wanted):
            agent_name = f"{pool.name}-{uuid.uuid4().hex[:8]}"
            try:
                await asyncio.to_thread(dispatch_workflow, pool, agent_name)
            except DispatchFailed as exc:
                log.warning("pool %s: could not launch an agent: %s", pool.name, exc)
                break
            state.inflight.append(Launch(agent_name, time.monotonic()))
            done += 1
        log.info("pool %s: demand %d, free slots %d: launched %d agent(s), %d in flight",
                 pool.name, demand, free, done, len(state.inflight))
        return done


class DispatchFailed(Exception):
    pass


def dispatch_workflow(pool: EphemeralPoolSettings, agent_name: str) -> None:
    """GitHub's ``workflow_dispatch`` REST call (answers 204 No Content)."""
    url = (f"{pool.github_api_url.rstrip('/')}/repos/{pool.repository}/actions/workflows/"
           f"{pool.workflow}/dispatches")
    inputs = {"runner_url": pool.runner_url, "oidc_audience": pool.oidc_audience,
              "systems": " ".join(pool.systems), "features": " ".join(pool.features),
              "max_jobs": str(pool.max_jobs), "agent_name": agent_name}
    try:
        response = requests.post(url, json={"ref": pool.ref, "inputs": inputs}, headers={
            "Authorization": f"Bearer {pool.github_token}",
            "Accept": "application/vnd.github+json", "X-GitHub-Api-Version": "2022-11-28",
        }, timeout=HTTP_TIMEOUT_SECS)
    except requests.RequestException as exc:
        raise DispatchFailed(f"{type(exc).__name__} talking to {pool.github_api_url}") from None
    if response.status_code not in (200, 201, 204):
        raise DispatchFailed(f"GitHub answered {response.status_code}: "
                             f"{response.text[:200]}")
