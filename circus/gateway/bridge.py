"""Agents as consumers of the class queues, through the same leases as local workers.

A wake-up token on ``build.<class>`` (consumed here for every class some
connected agent can serve) or the periodic sweep makes the bridge *fill* that
class: while an agent with a free slot can take it (capability rule, PSI gate,
strategy), claim one step for that agent (``leases.claim_steps``) and push it
with ``Builder.assign``. Each connected agent holds its steps through a
``steps.holder.StepHolder`` (worker ``agent.lease_holder``), like local and SSH
builders: claims, lease renewal, the result through the one finishing path,
and a disconnect handing the agent's steps back at once. The holder's calls
block, so they run in threads (``asyncio.to_thread``) off the loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from circus.common.config import Settings
from circus.common.enums import BuildStatus
from circus.common.nix.derivation import read_derivation
from circus.common.nix.store import StoreError
from circus.common.nix.store.aio import input_closure, invalid_paths
from circus.gateway import sessions as session_rows
from circus.gateway.server import ConnectedAgent, Gateway
from circus.gateway.sinks import ReportedResult, StepSinks, make_sinks, wait_result
from circus.queue_runner.builds.products import read_output_result
from circus.queue_runner.routing.capabilities import Capabilities
from circus.queue_runner.routing.strategy import Candidate, choose
from circus.queue_runner.routing.wakeups import Publish
from circus.queue_runner.steps.holder import StepHolder
from circus.queue_runner.steps.leases import ClaimedStep, ClaimOptions, holds_lease
from circus.queue_runner.steps.logs import final_log, log_path_for
from circus.queue_runner.steps.outcomes import FinishReport, StepOutcome

log = logging.getLogger(__name__)

#: how the agent's outcome shows as a step status; ``None`` = infrastructure, retried
STATUS_OF_OUTCOME: dict[str, BuildStatus | None] = {
    "success": BuildStatus.succeeded,
    "buildFailure": BuildStatus.failed,
    "failedWithOutput": BuildStatus.failed_with_output,
    "timedOut": BuildStatus.timeout,
    "logLimitExceeded": BuildStatus.log_limit_exceeded,
    "oomKilled": BuildStatus.oom_killed,
    "aborted": None,
    "preparingFailure": None,
    "importFailure": None,
    "uploadFailure": None,
    "postProcessFailure": None,
}

SWEEP_SECS = 1.0
DECLINE_PAUSE_SECS = 5.0


def _utc(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC)


class Bridge:
    def __init__(self, gateway: Gateway, settings: Settings, publish: Publish | None,
                 on_built: Callable[[FinishReport], None] | None = None) -> None:
        self.gateway = gateway
        self.settings = settings
        self.publish = publish
        self.on_built = on_built
        self.runner = settings.queue_runner
        self.nix_env = settings.nix_environ()
        self.loop: asyncio.AbstractEventLoop | None = None
        self._filling: set[str] = set()
        #: every class steps were ever queued in (``queue_classes``), refreshed by the sweep
        self.known_classes: list[str] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self.assigned = 0
        gateway.on_disconnect.append(self.release_agent)
        gateway.on_agent_change.append(self.kick_all)

    # ------------------------------------------------------------ who can build

    def candidates(self) -> list[Candidate]:
        now = asyncio.get_running_loop().time()
        found = []
        for agent in self.gateway.agents.values():
            beat = agent.heartbeat
            pressure = None
            if "cpu_psi_avg10" in beat:
                pressure = (beat["cpu_psi_avg10"], beat["mem_psi_avg10"], beat["io_psi_avg10"])
            facts = agent.facts
            found.append(Candidate(
                key=agent.connection_id, capabilities=capabilities_of(agent),
                speed_factor=facts.speed_factor, cpu_count=facts.cpu_count,
                max_jobs=facts.max_jobs, current_jobs=len(agent.in_flight),
                pressure=pressure,
                heartbeat_age=(now - agent.heartbeat_at) if agent.heartbeat_at else None,
                disabled=agent.paused_until > now))
        return found

    def servable_classes(self, known: list[str]) -> list[str]:
        """Known classes some connected agent with a free slot could take."""
        agents = [a for a in self.gateway.agents.values() if a.free_slots > 0]
        return [c for c in known if any(capabilities_of(a).can_serve(c) for a in agents)]

    # ------------------------------------------------------------ filling

    def kick(self, queue_class: str) -> None:
        """Fill ``queue_class`` (callable from the loop; see :meth:`kick_threadsafe`)."""
        if queue_class in self._filling:
            return
        task = asyncio.ensure_future(self.fill(queue_class))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def kick_threadsafe(self, queue_class: str) -> None:
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.kick, queue_class)

    def kick_all(self) -> None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return
        task = asyncio.ensure_future(self.sweep())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def sweep(self) -> None:
        """Fill every class that has queued steps an agent could take."""
        if not any(a.free_slots for a in self.gateway.agents.values()):
            return
        queued, self.known_classes = await self.gateway.db(lambda s: (
            list(s.execute(text(
                "SELECT DISTINCT queue_class FROM steps WHERE state = 'queued'")).scalars()),
            list(s.execute(text("SELECT name FROM queue_classes")).scalars())))
        for queue_class in self.servable_classes(queued):
            self.kick(queue_class)

    async def fill(self, queue_class: str) -> None:
        self._filling.add(queue_class)
        #: set once a trusted-only agent found nothing it may take in this class
        untrusted_left = False
        try:
            while True:
                candidates = self.candidates()
                if untrusted_left:
                    candidates = [c for c in candidates if c.key in self.gateway.agents
                                  and not self.gateway.agents[c.key].trusted_only]
                chosen = choose(candidates, queue_class,
                                strategy=self.runner.scheduling_strategy,
                                psi_threshold=self.runner.psi_threshold,
                                heartbeat_ttl=float(self.runner.rpc.heartbeat_ttl_secs))
                if chosen is None:
                    return
                agent = self.gateway.agents.get(chosen.key)
                if agent is None:
                    return
                claimed: list[ClaimedStep] = await self.gateway.db(
                    self._claimer(agent, queue_class))
                if not claimed:
                    if agent.trusted_only and not untrusted_left:
                        # what is left may be for pull requests only: other agents
                        untrusted_left = True
                        continue
                    return
                step = claimed[0]
                agent.in_flight.add(step.id)
                try:
                    await self.assign(agent, step)
                except Exception:
                    # claimed but never sent (the database failed between the claim and
                    # the assignment): held, the bridge would renew its lease for as
                    # long as the agent stays connected, and nobody would build it
                    log.exception("could not assign step %s to %s; handing it back",
                                  step.id, agent.facts.name)
                    await self.hand_back(agent, [step.id])
                    return
        finally:
            self._filling.discard(queue_class)

    def holder_of(self, agent: ConnectedAgent) -> StepHolder:
        """The holder of ``agent``'s steps (one per connection, as its lease holder)."""
        if agent.holder is None:
            agent.holder = StepHolder(
                self.settings, self.gateway.session_factory, worker_name(agent),
                publish=self.publish, on_built=self.on_built,
                # a third of the lease, not every 2 s: one loop renews for every agent,
                # a transaction each (a cancelled step stops within lease_secs / 3)
                renew_every=max(0.5, self.runner.lease_secs / 3))
        return agent.holder

    def _claimer(self, agent: ConnectedAgent, queue_class: str
                 ) -> Callable[[Session], list[ClaimedStep]]:
        holder = self.holder_of(agent)

        def claim(session: Session) -> list[ClaimedStep]:
            # one step per assignment: an agent builds one derivation per slot
            project_ids = agent.project_ids
            return holder.claim(session, queue_class, ClaimOptions(
                limit=1, machine=agent.facts.name, lookahead=False,
                trusted_only=agent.trusted_only,
                project_ids=None if project_ids is None else tuple(project_ids)))

        return claim

    async def assign(self, agent: ConnectedAgent, step: ClaimedStep) -> None:
        worker = worker_name(agent)
        try:
            drv = read_derivation(step.drv_path)
            inputs = await input_closure(step.drv_path, self.nix_env)
        except (OSError, ValueError, StoreError) as exc:
            await self.finish(agent, step, StepOutcome(
                step.id, BuildStatus.aborted, error_message=f"cannot prepare the step: {exc}",
                retry=True), None)
            return
        # the build whose own derivation this is (its outputs may be uploaded straight
        # to S3), else any build waiting for it
        build_id, toplevel = await self.gateway.db(lambda s: s.execute(text(
            "SELECT build_id, is_toplevel FROM build_steps WHERE step_id = :id "
            "ORDER BY is_toplevel DESC, build_id LIMIT 1"), {"id": step.id}).one_or_none()
            or (None, False))
        upload = self.settings.cache_upload
        log_path = log_path_for(self.settings.logs.log_dir, step.drv_path, step.id)
        outputs = frozenset(drv.output_paths.values())
        agent.outputs[step.id] = outputs
        agent.log_paths[step.id] = log_path

        def leased() -> bool:
            return not agent.closed and step.id in agent.in_flight \
                and step.id not in agent.reported

        async def lease_held() -> bool:
            return leased() and bool(await self.gateway.db(
                lambda s: holds_lease(s, worker, step.id)))

        sinks = make_sinks(step.id, log_path, self.runner.max_log_size, self.nix_env, inputs,
                           on_report=lambda: agent.reported.add(step.id), outputs=outputs,
                           leased=leased, lease_held=lease_held)
        assignment = {
            "buildId": int(build_id or 0), "stepId": step.id, "drvPath": step.drv_path,
            "maxLogSize": self.runner.max_log_size,
            "maxSilentTime": step.max_silent or self.runner.max_silent_time,
            "buildTimeout": step.timeout or self.runner.build_timeout,
            "extraNixArgs": list(self.runner.extra_nix_build_args),
            "expectedOutputs": sorted(drv.output_paths.values()),
            "inputClosure": inputs,
            "presign": {"enabled": bool(upload.enabled and toplevel and self.settings.signing.key),
                        "compression": upload.compression.value, "level": 3,
                        "failBuildOnUploadError": upload.fail_build_on_upload_error},
            "cacheSubstituter": self.runner.rpc.cache_substituter or "",
            "cachePublicKey": self.runner.rpc.cache_public_key or "",
        }
        try:
            response = await agent.builder.assign(assignment, sinks.log_sink, sinks.result_sink,
                                                  sinks.output_sink, sinks.input_source)
        except Exception as exc:  # the connection broke under us
            log.warning("could not assign step %s to %s: %s", step.id, agent.facts.name, exc)
            await self.hand_back(agent, [step.id])
            return
        if not response.accepted:
            log.info("agent %s declined step %s: %s", agent.facts.name, step.id,
                     response.reason)
            # a draining or full agent would decline again at once: leave it alone a while
            agent.paused_until = asyncio.get_running_loop().time() + DECLINE_PAUSE_SECS
            await self.hand_back(agent, [step.id])
            return
        self.assigned += 1
        log.info("step %s (%s) assigned to %s", step.id, step.drv_path, agent.facts.name)
        task = asyncio.ensure_future(self.complete(agent, step, sinks, worker))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def complete(self, agent: ConnectedAgent, step: ClaimedStep, sinks: StepSinks,
                       worker: str) -> None:
        gone = asyncio.get_running_loop().create_future()
        agent.closed_waiters.append(gone)
        result = await wait_result(sinks, gone)
        if result is None and sinks.result.done():
            result = sinks.result.result()
        if result is None:
            return  # disconnected before reporting: release_agent handed the step back
        await self.finish(agent, step, outcome_from(step, result, agent), result)

    async def finish(self, agent: ConnectedAgent, step: ClaimedStep, outcome: StepOutcome,
                     result: ReportedResult | None) -> None:
        agent.in_flight.discard(step.id)
        agent.reported.discard(step.id)
        agent.outputs.pop(step.id, None)
        agent.log_paths.pop(step.id, None)
        log_path = log_path_for(self.settings.logs.log_dir, step.drv_path, step.id)
        final = await asyncio.to_thread(final_log, log_path, self.settings.logs.compress)
        if final is not None:
            outcome.log_path, outcome.log_size = str(final), (result.log_bytes if result else 0)
        output_result = None
        if outcome.status in (BuildStatus.succeeded, BuildStatus.failed_with_output):
            try:
                drv = read_derivation(step.drv_path)
                wanted = list(drv.output_paths.values())
                known = set(result.imported) | set(result.already_valid) if result else set()
                # what the transfer proved valid needs no Nix call to check again
                still_missing = [p for p in wanted if p not in known]
                if still_missing:
                    still_missing = await invalid_paths(still_missing, self.nix_env)
            except (OSError, ValueError, StoreError) as exc:
                still_missing, drv = ["?"], None
                outcome.error_message = str(exc)
            if still_missing or drv is None:
                outcome.status, outcome.retry = BuildStatus.aborted, True
                outcome.error_message = "the agent reported success but the outputs did not " \
                    "arrive in the runner's store"
            else:
                output_result = await asyncio.to_thread(read_output_result, drv.output_paths)
        succeeded = outcome.status is BuildStatus.succeeded

        def count_result(session: Session, report: FinishReport) -> None:
            session_rows.record_result(session, agent.session_id, succeeded)

        report = await asyncio.to_thread(
            self.holder_of(agent).finish, [outcome],
            {step.id: output_result} if output_result else {}, also=count_result)
        if report is None:
            return  # not recorded: the lease lapses
        self.kick(step.queue_class)
        self.kick_all()

    async def hand_back(self, agent: ConnectedAgent, step_ids: list[int]) -> None:
        for step_id in step_ids:
            agent.in_flight.discard(step_id)
            agent.outputs.pop(step_id, None)
            agent.log_paths.pop(step_id, None)
        await asyncio.to_thread(self.holder_of(agent).release, step_ids)

    async def release_agent(self, agent: ConnectedAgent) -> None:
        """A disconnect: everything the agent held returns to the queue at once."""
        for waiter in agent.closed_waiters:
            if not waiter.done():
                waiter.set_result(None)
        # a reported result is recorded even when the agent left right after sending it
        unreported = sorted(agent.in_flight - agent.reported)
        if unreported:
            # the next attempt appends to the same log: say where this one ended
            note = (f"\ncircus: this attempt was lost with agent {agent.facts.name!r} "
                    "(it disconnected); the step goes back to the queue\n").encode()
            paths = [agent.log_paths[s] for s in unreported if s in agent.log_paths]
            await asyncio.to_thread(_append_to_logs, paths, note)
            await self.hand_back(agent, unreported)

    # ------------------------------------------------------------ leases

    async def renew_leases(self) -> None:
        """Renew each connected agent's lease when due; abort what was taken away."""
        for agent in list(self.gateway.agents.values()):
            holder = agent.holder
            if holder is None or not holder.held or not holder.renew_due():
                continue
            renewal = await asyncio.to_thread(holder.renew)
            for step_id in sorted(renewal.lost):
                # cancelled by a user, or taken over: stop it on the agent
                agent.in_flight.discard(step_id)
                agent.outputs.pop(step_id, None)
                log.info("step %s no longer held by %s; aborting it there", step_id,
                         agent.facts.name)
                try:
                    await agent.builder.abort(step_id)
                except Exception:
                    log.debug("abort of step %s failed", step_id, exc_info=True)

    async def run(self) -> None:
        """Periodic work on the gateway's loop: lease renewal and the sweep."""
        self.loop = asyncio.get_running_loop()
        while True:
            try:
                # before renewing: a silent agent's leases must lapse, not be renewed
                await self.gateway.drop_silent()
                await self.gateway.record_pending_disconnects()
                await self.renew_leases()
                await self.sweep()
            except Exception:
                log.exception("agent bridge round failed")
            await asyncio.sleep(SWEEP_SECS)


def _append_to_logs(paths: list[Path], note: bytes) -> None:
    for path in paths:
        try:
            with path.open("ab") as handle:
                handle.write(note)
        except OSError as exc:  # the note is best effort; the hand-back is what counts
            log.warning("cannot note the lost attempt in %s: %s", path, exc)


def worker_name(agent: ConnectedAgent) -> str:
    return agent.lease_holder


def capabilities_of(agent: ConnectedAgent) -> Capabilities:
    facts = agent.facts
    return Capabilities(frozenset(facts.systems), frozenset(facts.supported_features),
                        frozenset(facts.mandatory_features))


def outcome_from(step: ClaimedStep, result: ReportedResult, agent: ConnectedAgent
                 ) -> StepOutcome:
    if result.refused:
        # the agent sent what the step does not make: no other attempt, nothing published
        return StepOutcome(step.id, BuildStatus.aborted, error_message=result.refused,
                           machine=agent.facts.name, retry=False)
    status = STATUS_OF_OUTCOME.get(result.outcome)
    if result.log_truncated and status is BuildStatus.succeeded:
        status = BuildStatus.log_limit_exceeded
    return StepOutcome(
        step.id, status or BuildStatus.aborted,
        exit_code=result.exit_code if result.exit_code >= 0 else None,
        error_message=result.error_message or None,
        started_at=_utc(result.started_at) if result.started_at else None,
        finished_at=_utc(result.finished_at) if result.finished_at else None,
        machine=agent.facts.name, retry=status is None)
