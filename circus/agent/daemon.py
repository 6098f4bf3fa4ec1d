"""The agent daemon: dial the gateway, register, accept assignments, send heartbeats.

Persistent agents keep their machine id and reconnect after a delay. Ephemeral
agents (one CI run) take a fresh id and a unique name, and stop — draining what
they are building — after ``max_builds``, ``max_idle_secs`` or
``max_lifetime_secs``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import time
from pathlib import Path
from typing import Any

from circus import __version__
from circus.agent.config import AgentSection
from circus.agent.identity import agent_name, ephemeral_machine_id, persistent_machine_id
from circus.agent.jobs import Job, JobEnvironment, run_job
from circus.agent.oidc import OidcTokenUnavailable, github_actions_token
from circus.agent.sysinfo import host_status
from circus.common import logcontext
from circus.common.nix.environment import current_system, nix_environ, sandbox_options
from circus.protocol import protocol_version, schema
from circus.protocol.limits import TRAVERSAL_LIMIT_WORDS

log = logging.getLogger(__name__)


class RegistrationRefused(Exception):
    """The gateway said no (token, version, limits); retrying will not help."""


class Agent:
    def __init__(self, config: AgentSection, *, ephemeral: bool | None = None) -> None:
        self.config = config
        self.ephemeral = config.ephemeral.enabled if ephemeral is None else ephemeral
        work_dir = Path(config.work_dir)
        if self.ephemeral:
            self.machine_id = ephemeral_machine_id()
        else:
            id_file = Path(config.machine_id_file) if config.machine_id_file \
                else work_dir / "machine-id"
            self.machine_id = persistent_machine_id(id_file)
        self.name = agent_name(config.name, self.machine_id, self.ephemeral)
        self.systems = config.systems or [current_system()]
        self.jobs: dict[int, Job] = {}
        self.builds_done = 0
        self.builds_accepted = 0
        self.started = time.monotonic()
        self.idle_since = time.monotonic()
        self.draining = False
        self.stop_requested = asyncio.Event()
        self.environment = JobEnvironment(
            nix_env=nix_environ(config.substituters, config.trusted_public_keys,
                                extra={**sandbox_options(config.sandbox, config.sandbox_paths),
                                       **config.nix_config}),
            max_log_size=config.max_log_size, cores=config.cores,
            system_features=sorted(set(config.features) | set(config.mandatory_features)))

    # -- lifecycle ------------------------------------------------------------

    def request_stop(self, reason: str) -> None:
        if not self.draining:
            log.info("draining: %s", reason)
        self.draining = True
        if not self.jobs:
            self.stop_requested.set()

    def _check_limits(self) -> None:
        eph = self.config.ephemeral
        if not self.ephemeral:
            return
        if eph.max_builds and self.builds_accepted >= eph.max_builds:
            self.request_stop(f"max_builds ({eph.max_builds}) reached")
        if eph.max_lifetime_secs and time.monotonic() - self.started > eph.max_lifetime_secs:
            self.request_stop(f"max_lifetime_secs ({eph.max_lifetime_secs}) reached")
        if eph.max_idle_secs and not self.jobs and \
                time.monotonic() - self.idle_since > eph.max_idle_secs:
            self.request_stop(f"idle for {eph.max_idle_secs}s")

    def _job_finished(self, step_id: int) -> None:
        self.jobs.pop(step_id, None)
        self.builds_done += 1
        if not self.jobs:
            self.idle_since = time.monotonic()
            if self.draining:
                self.stop_requested.set()
        self._check_limits()

    # -- the Builder capability the runner calls -----------------------------

    def builder(self) -> Any:
        agent = self
        proto = schema()

        class BuilderImpl(proto.Builder.Server):  # type: ignore[misc,name-defined]
            async def assign(self, job: Any, logSink: Any, resultSink: Any,
                             outputSink: Any, inputs: Any, _context: Any, **kwargs: Any
                             ) -> tuple[bool, str]:
                if agent.draining:
                    return False, "agent is draining"
                if len(agent.jobs) >= agent.config.max_jobs:
                    return False, "agent is at max_jobs"
                entry = Job(step_id=job.stepId, build_id=job.buildId, drv_path=job.drvPath)
                assignment = job.as_builder() if hasattr(job, "as_builder") else job
                agent.jobs[entry.step_id] = entry
                agent.builds_accepted += 1

                ids = {"step_id": entry.step_id, "build_id": entry.build_id,
                       "drv_path": entry.drv_path}

                async def work() -> None:
                    # the task runs in a copy of the context at its creation: ids bound
                    # here stay with this step's lines, not with other jobs'
                    with logcontext.bound(**ids):
                        try:
                            await run_job(entry, assignment, logSink, resultSink, outputSink,
                                          inputs, agent.environment)
                        except Exception:
                            log.exception("step %s failed on the agent", entry.step_id)
                        finally:
                            agent._job_finished(entry.step_id)

                entry.task = asyncio.ensure_future(work())
                with logcontext.bound(**ids):
                    log.info("accepted step %s (%s)", entry.step_id, entry.drv_path)
                agent._check_limits()
                return True, ""

            async def abort(self, stepId: int, _context: Any, **kwargs: Any) -> None:
                entry = agent.jobs.get(stepId)
                if entry is not None:
                    log.info("aborting step %s", stepId)
                    entry.cancel.set()

            async def shutdown(self, reason: str, _context: Any, **kwargs: Any) -> None:
                agent.request_stop(f"runner asked: {reason}")

        return BuilderImpl()

    # -- connection ----------------------------------------------------------

    def _ssl_context(self) -> ssl.SSLContext | None:
        if not self.config.uses_tls:
            return None
        tls = self.config.tls
        context = ssl.create_default_context(cafile=tls.ca_file)
        if tls.cert_file and tls.key_file:
            context.load_cert_chain(tls.cert_file, tls.key_file)
        return context

    def credential(self) -> str:
        """The configured token, else a fresh GitHub Actions ID token (they expire)."""
        if self.config.auth_token:
            return self.config.auth_token
        assert self.config.oidc_audience
        return github_actions_token(self.config.oidc_audience)

    def agent_info(self) -> dict[str, Any]:
        return {
            "hostname": socket.gethostname(),
            "name": self.name,
            "machineId": self.machine_id,
            "systems": self.systems,
            "supportedFeatures": self.config.features,
            "mandatoryFeatures": self.config.mandatory_features,
            "speedFactor": self.config.speed_factor,
            "cpuCount": os.cpu_count() or 1,
            "maxJobs": self.config.max_jobs,
            "protoVersion": protocol_version(),
            "authToken": self.credential(),
            "ephemeral": self.ephemeral,
            "agentVersion": __version__,
        }

    def heartbeat_message(self) -> dict[str, Any]:
        status = host_status()
        return {
            "load1": status.load1, "load5": status.load5, "load15": status.load15,
            "memTotal": status.mem_total, "memUsed": status.mem_used,
            "storeFree": status.store_free, "buildDirFree": status.build_dir_free,
            "currentJobs": len(self.jobs),
            "cpu": {"avg10": status.cpu.avg10, "avg60": status.cpu.avg60},
            "mem": {"avg10": status.mem.avg10, "avg60": status.mem.avg60},
            "io": {"avg10": status.io.avg10, "avg60": status.io.avg60},
            "hasPressure": status.has_pressure,
        }

    async def session_once(self) -> None:
        """One connection: register, heartbeat until it drops or we stop."""
        import capnp

        context = self._ssl_context()
        kwargs: dict[str, Any] = {"host": self.config.host, "port": self.config.port}
        if context is not None:
            kwargs["ssl"] = context
            kwargs["server_hostname"] = self.config.tls.server_name or self.config.host
        stream = await capnp.AsyncIoStream.create_connection(**kwargs)
        client = capnp.TwoPartyClient(stream, traversal_limit_in_words=TRAVERSAL_LIMIT_WORDS)
        runner = client.bootstrap().cast_as(schema().Runner)
        version = await runner.version()
        if version.proto != protocol_version():
            raise RegistrationRefused(
                f"gateway speaks protocol {version.proto}, this agent {protocol_version()}")
        try:
            # the info may need an HTTP request (a fresh OIDC token): off the loop
            info = await asyncio.to_thread(self.agent_info)
            registered = await runner.register(info, self.builder())
        except capnp.KjException as exc:
            # only the gateway's own "refused: …" is final; anything else (its database
            # restarting, say) is a failure like a lost connection: dial again
            if not _is_refusal(exc):
                raise
            raise RegistrationRefused(_remote_reason(exc)) from None
        self.environment.runner = runner
        self.environment.machine_id = self.machine_id
        log.info("registered with %s as %s (machine id %s, session %s)",
                 version.server, self.name, self.machine_id, registered.sessionId)
        session = registered.session
        try:
            while not self.stop_requested.is_set():
                try:
                    await asyncio.wait_for(session.heartbeat(self.heartbeat_message()),
                                           timeout=self.config.heartbeat_timeout_secs)
                except TimeoutError:
                    raise ConnectionError(
                        f"no answer to a heartbeat within {self.config.heartbeat_timeout_secs}"
                        " s (agent.heartbeat_timeout_secs)") from None
                self._check_limits()
                try:
                    await asyncio.wait_for(self.stop_requested.wait(),
                                           timeout=self.config.heartbeat_interval_secs)
                except TimeoutError:
                    pass
        finally:
            # the runner re-queues in-flight work when we go; stop building it
            for entry in list(self.jobs.values()):
                entry.cancel.set()
            # a dead connection (no answer) is not closed by the peer: close our end
            stream.close()

    async def run(self) -> int:
        import capnp

        while not self.stop_requested.is_set():
            try:
                await self.session_once()
            except RegistrationRefused as exc:
                log.error("the gateway refused this agent: %s", exc)
                return 3
            except OidcTokenUnavailable as exc:
                log.error("no credential for the gateway: %s", exc)
                return 3
            except (OSError, capnp.KjException, EOFError) as exc:
                log.warning("connection to %s lost: %s", self.config.runner_url, exc)
            if self.stop_requested.is_set() or (self.ephemeral and self.draining):
                break
            await asyncio.sleep(self.config.reconnect_delay_secs)
        log.info("agent %s stopped after %d build(s)", self.name, self.builds_done)
        return 0


def _is_refusal(exc: Exception) -> bool:
    return "refused:" in (getattr(exc, "description", None) or str(exc))


def _remote_reason(exc: Exception) -> str:
    text = getattr(exc, "description", None) or str(exc)
    marker = "refused:"
    return text[text.index(marker):].strip() if marker in text else text.strip()
