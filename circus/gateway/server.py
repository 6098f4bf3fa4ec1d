"""The Cap'n Proto server agents dial: registration, sessions, heartbeats.

Runs its own asyncio loop (with pycapnp's KJ loop) in a thread of the queue
runner. Database work is synchronous SQLAlchemy, moved off the loop with
``asyncio.to_thread``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from circus import __version__
from circus.common.config import Settings
from circus.common.enums import AuthKind
from circus.common.errors import CircusError
from circus.common.models import Project
from circus.common.repository import RepositoryUrlError, parse_repository
from circus.gateway import sessions as session_rows
from circus.gateway.auth import client_cert_cn, server_ssl_context, token_accepted, token_digest
from circus.gateway.oidc import OidcIdentity, OidcRejected, OidcVerifier, looks_like_jwt
from circus.protocol import error_summary, protocol_version, schema
from circus.protocol.limits import (
    MAX_PRESIGN_REQUESTS,
    MAX_STORE_PATH,
    TRAVERSAL_LIMIT_WORDS,
    LimitExceeded,
    check_agent_info,
    check_text,
)
from circus.queue_runner.steps.holder import StepHolder
from circus.queue_runner.steps.leases import holds_lease, waits_for

log = logging.getLogger(__name__)


class Refused(Exception):
    """Raised inside a gateway call: the agent sees the message as the reason."""


def not_leased(step_id: int) -> str:
    return f"refused: step {step_id} is not leased to this agent"


@dataclass
class ConnectedAgent:
    session_id: int
    connection_id: str
    facts: session_rows.AgentFacts
    builder: Any
    #: steps currently assigned to this agent
    in_flight: set[int] = field(default_factory=set)
    #: steps whose result the agent reported (being recorded: never handed back)
    reported: set[int] = field(default_factory=set)
    heartbeat: dict[str, Any] = field(default_factory=dict)
    heartbeat_at: float = 0.0
    #: loop time the agent was last heard from (registration or heartbeat)
    heard_at: float = 0.0
    #: closes the connection (set once registered); a silent agent's is closed for it
    close_connection: Callable[[], None] | None = None
    #: loop time until which the agent gets no new work (it declined an assignment)
    paused_until: float = 0.0
    closed: bool = False
    #: futures resolved when the connection goes (results still awaited)
    closed_waiters: list[asyncio.Future[None]] = field(default_factory=list)
    #: OIDC agents: the projects of the token's repository, the only ones they build for
    project_ids: list[int] | None = None
    #: who it authenticated as: a token's digest, or the OIDC repository and subject
    credential: str = ""
    #: the output paths of each step in flight, the only paths it may upload or send
    outputs: dict[int, frozenset[str]] = field(default_factory=dict)
    #: the log file of each step in flight (a lost attempt is noted there)
    log_paths: dict[int, Path] = field(default_factory=dict)
    #: its steps' leases, claims and results (``Bridge.holder_of``)
    holder: StepHolder | None = None

    @property
    def lease_holder(self) -> str:
        """The ``worker`` of the steps it holds; per connection, so a stale connection
        can never finish (or upload for) a step a newer one holds."""
        return f"agent:{self.facts.name}:{self.connection_id[:12]}"

    def leased_outputs(self, step_id: int) -> frozenset[str]:
        """The outputs of ``step_id`` if this session holds it (not yet reported), else
        :class:`Refused`. The database lease is checked as well where it matters
        (:meth:`Gateway.require_lease`)."""
        if self.closed or step_id not in self.in_flight or step_id in self.reported:
            raise Refused(not_leased(step_id))
        return self.outputs.get(step_id, frozenset())

    @property
    def worker_name(self) -> str:
        return f"agent:{self.facts.name}"

    @property
    def free_slots(self) -> int:
        return max(0, self.facts.max_jobs - len(self.in_flight))

    @property
    def trusted_only(self) -> bool:
        """Ephemeral and OIDC agents (CI runners) never build for pull requests alone
        (SPEC §5)."""
        return self.facts.ephemeral or self.facts.auth_kind is AuthKind.oidc


@dataclass
class PeerInfo:
    address: str
    tls: bool
    client_cn: str | None


def projects_of_repository(session: Session, repository: str) -> list[int]:
    """Ids of the projects whose repository URL names ``owner/name`` (any host)."""
    found = []
    for project_id, url in session.execute(select(Project.id, Project.repository_url)):
        try:
            if url and parse_repository(url).path.lower() == repository.lower():
                found.append(int(project_id))
        except RepositoryUrlError:
            continue
    return found


class _Unregistered:
    """One connection counted in ``Gateway.unregistered`` until it registers or goes."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.counted = True
        gateway.unregistered += 1

    def release(self) -> None:
        if self.counted:
            self.counted = False
            self.gateway.unregistered -= 1


class Gateway:
    """State shared by all connections; the scheduler reads ``agents``."""

    def __init__(self, settings: Settings, session_factory: sessionmaker[Session]) -> None:
        self.settings = settings
        self.session_factory = session_factory
        self.rpc = settings.queue_runner.rpc
        self.name = f"gateway@{socket.gethostname()}"
        self.agents: dict[str, ConnectedAgent] = {}  # by connection id
        self.on_agent_change: list[Callable[[], None]] = []
        self.on_disconnect: list[Callable[[ConnectedAgent], Any]] = []
        self.server: asyncio.base_events.Server | None = None
        self.oidc = OidcVerifier(self.rpc.oidc) if self.rpc.oidc.enabled else None
        #: connections that have not registered (yet)
        self.unregistered = 0
        #: agent names being registered right now, with their credential
        self._registering: dict[str, str] = {}
        #: disconnects the database could not record yet: session id → connection id
        #: (:meth:`record_pending_disconnects` retries them)
        self.unrecorded_disconnects: dict[int, str] = {}

    # -- database helpers (run in threads) ------------------------------------

    def _in_transaction(self, work: Callable[[Session], Any]) -> Any:
        with self.session_factory() as session, session.begin():
            return work(session)

    async def db(self, work: Callable[[Session], Any]) -> Any:
        return await asyncio.to_thread(self._in_transaction, work)

    # -- registration ----------------------------------------------------------

    def check_registration(self, info: Any, peer: PeerInfo) -> None:
        try:
            check_agent_info(info.name, info.hostname, info.authToken, info.systems,
                             info.supportedFeatures, info.mandatoryFeatures)
        except LimitExceeded as exc:
            raise Refused(f"refused: {exc}") from None
        if info.protoVersion != protocol_version():
            raise Refused(f"refused: protocol version {info.protoVersion} is not supported "
                          f"(gateway speaks {protocol_version()})")
        if not peer.tls and not self.rpc.allow_plaintext:
            raise Refused("refused: credentials over plaintext TCP are not allowed "
                          "(use TLS or set queue_runner.rpc.allow_plaintext)")
        if self.rpc.tls.pin_cn and peer.client_cn != self.rpc.tls.pin_cn:
            raise Refused("refused: client certificate CN does not match")
        if not info.name or not info.machineId or not info.systems:
            raise Refused("refused: name, machineId and systems are required")

    def pool_of(self, name: str) -> str | None:
        """The ephemeral pool whose launches are named ``<pool>-…`` (autoscale.py)."""
        for pool in self.settings.queue_runner.ephemeral_pools:
            if name.startswith(f"{pool.name}-"):
                return pool.name
        return None

    async def authenticate(self, token: str) -> OidcIdentity | None:
        """A configured bearer token (None), or a GitHub Actions ID token (its identity)."""
        if token and self.oidc is not None and looks_like_jwt(token):
            try:
                return await asyncio.to_thread(self.oidc.verify, token)
            except OidcRejected as exc:
                raise Refused(f"refused: {exc}") from None
        if not token or not token_accepted(token, self.rpc.auth_tokens):
            raise Refused("refused: invalid agent token")
        return None

    async def register(self, info: Any, builder: Any, peer: PeerInfo
                       ) -> ConnectedAgent:
        try:
            self.check_registration(info, peer)
            identity = await self.authenticate(str(info.authToken))
        except Refused as exc:
            log.warning("agent %r from %s %s", str(info.name)[:128], peer.address, exc)
            raise
        credential = (token_digest(str(info.authToken)) if identity is None
                      else f"oidc:{identity.repository}:{identity.subject}")
        self._claim_name(str(info.name), credential, peer)
        try:
            return await self._register(info, builder, peer, identity, credential)
        finally:
            self._registering.pop(str(info.name), None)

    def _claim_name(self, name: str, credential: str, peer: PeerInfo) -> None:
        """Refuse a name a connected agent holds under another credential.

        The same credential may take the name over (an agent reconnecting before
        its old connection timed out); another one would evict a working agent.
        """
        holders = [a.credential for a in self.agents.values() if a.facts.name == name]
        if name in self._registering:
            holders.append(self._registering[name])
        if any(holder != credential for holder in holders):
            log.warning("agent %r from %s refused: the name is connected with another "
                        "credential", name[:128], peer.address)
            raise Refused(f"refused: an agent named {name!r} is already connected "
                          "with another credential")
        self._registering[name] = credential

    async def _register(self, info: Any, builder: Any, peer: PeerInfo,
                        identity: OidcIdentity | None, credential: str) -> ConnectedAgent:
        facts = session_rows.AgentFacts(
            machine_id=info.machineId, name=info.name, hostname=info.hostname,
            systems=list(info.systems), supported_features=list(info.supportedFeatures),
            mandatory_features=list(info.mandatoryFeatures),
            speed_factor=float(info.speedFactor or 1.0), cpu_count=int(info.cpuCount or 1),
            max_jobs=max(1, int(info.maxJobs or 1)), proto_version=int(info.protoVersion),
            ephemeral=bool(info.ephemeral),
            auth_kind=AuthKind.token if identity is None else AuthKind.oidc,
            pool=self.pool_of(str(info.name)) if info.ephemeral else None)
        connection_id = uuid.uuid4().hex
        session_id = await self.db(
            lambda s: session_rows.record_connect(s, facts, connection_id, self.name))
        # a newer connection of the same agent replaces an older one still open
        for old in [a for a in self.agents.values() if a.facts.name == facts.name]:
            log.info("agent %s reconnected; dropping its previous connection", facts.name)
            await self.drop(old)
        agent = ConnectedAgent(session_id, connection_id, facts, builder,
                               credential=credential)
        if identity is not None:
            agent.project_ids = await self.db(
                lambda s: projects_of_repository(s, identity.repository))
        agent.heard_at = asyncio.get_running_loop().time()
        self.agents[connection_id] = agent
        log.info("agent %s registered from %s (%s, max_jobs=%d%s)", facts.name, peer.address,
                 ",".join(facts.systems), facts.max_jobs,
                 "" if identity is None else f", OIDC: {identity.repository} "
                 f"{identity.subject}, projects {agent.project_ids}")
        self._changed()
        return agent

    async def drop(self, agent: ConnectedAgent) -> None:
        """Forget a connection: its in-flight steps go back to the queue at once.

        Never raises for the database: it runs in pycapnp's callbacks, where an
        exception aborts the process (KJ: "No event loop is running on this
        thread"). A disconnect the database cannot record now is retried by
        :meth:`record_pending_disconnects` (and a gateway that dies first marks its
        sessions disconnected at start); handing the steps back fails alike and
        leaves them to lease expiry.
        """
        if agent.closed:
            return
        agent.closed = True
        self.agents.pop(agent.connection_id, None)
        self.unrecorded_disconnects[agent.session_id] = agent.connection_id
        await self.record_pending_disconnects()
        # counted before the callbacks: handing back empties ``in_flight``
        handed_back = sorted(agent.in_flight - agent.reported)
        for callback in self.on_disconnect:
            try:
                result = callback(agent)
                if asyncio.iscoroutine(result):
                    await result
            except Exception:
                log.exception("after agent %s disconnected", agent.facts.name)
        log.info("agent %s disconnected (%d step(s) handed back%s)", agent.facts.name,
                 len(handed_back), f": {', '.join(map(str, handed_back))}" if handed_back
                 else "")
        self._changed()

    async def record_pending_disconnects(self) -> None:
        """Record the disconnects the database missed (it was down); kept for the next
        try when it still fails."""
        for session_id, connection_id in list(self.unrecorded_disconnects.items()):
            try:
                await self.db(functools.partial(session_rows.record_disconnect,
                                                session_id=session_id,
                                                connection_id=connection_id))
            except SQLAlchemyError as exc:
                log.warning("cannot record the disconnect of session %s yet (%s); "
                            "retrying", session_id, error_summary(exc))
                return
            if self.unrecorded_disconnects.get(session_id) == connection_id:
                del self.unrecorded_disconnects[session_id]

    async def drop_silent(self) -> list[str]:
        """Drop the agents not heard from for ``heartbeat_ttl_secs``; returns their names.

        A host whose network was cut (or that froze) never closes its connection:
        TCP would keep it open for many minutes, and its steps, whose leases the
        bridge renews for every connected agent, would wait that long. Dropping it
        hands them back at once; the connection is closed, so whatever the agent
        sends later is refused (its lease holder is per connection).
        """
        now = asyncio.get_running_loop().time()
        ttl = float(self.rpc.heartbeat_ttl_secs)
        silent = [a for a in self.agents.values() if now - a.heard_at > ttl]
        for agent in silent:
            log.warning("agent %s silent for %.1f s (queue_runner.rpc.heartbeat_ttl_secs = "
                        "%s): dropping its connection", agent.facts.name,
                        now - agent.heard_at, self.rpc.heartbeat_ttl_secs)
            await self.drop(agent)
            if agent.close_connection is not None:
                try:
                    agent.close_connection()
                except Exception:
                    log.debug("closing %s's connection failed", agent.facts.name,
                              exc_info=True)
        return [a.facts.name for a in silent]

    def _changed(self) -> None:
        for callback in self.on_agent_change:
            callback()

    async def heartbeat(self, agent: ConnectedAgent, beat: Any) -> bool:
        values: dict[str, Any] = {
            "load1": beat.load1, "load5": beat.load5, "load15": beat.load15,
            "mem_total": beat.memTotal, "mem_used": beat.memUsed,
            "store_free": beat.storeFree, "build_dir_free": beat.buildDirFree,
            "current_jobs": beat.currentJobs,
        }
        if beat.hasPressure:
            values.update({
                "cpu_psi_avg10": beat.cpu.avg10, "mem_psi_avg10": beat.mem.avg10,
                "io_psi_avg10": beat.io.avg10, "cpu_psi_avg60": beat.cpu.avg60,
                "mem_psi_avg60": beat.mem.avg60, "io_psi_avg60": beat.io.avg60,
            })
        agent.heartbeat = values
        agent.heartbeat_at = agent.heard_at = asyncio.get_running_loop().time()
        try:
            return bool(await self.db(lambda s: session_rows.record_heartbeat(
                s, agent.session_id, agent.connection_id, values)))
        except SQLAlchemyError as exc:
            # the agent is heard, only its row goes stale: failing the call would make
            # it drop the connection and its builds for a database restart
            log.warning("cannot record %s's heartbeat (%s)", agent.facts.name,
                        error_summary(exc))
            return True

    # -- serving ---------------------------------------------------------------

    def bootstrap(self, peer: PeerInfo, registered: list[ConnectedAgent],
                  on_register: Callable[[], None] = lambda: None) -> Any:
        gateway = self
        proto = schema()

        class AgentSessionImpl(proto.AgentSession.Server):  # type: ignore[misc,name-defined]
            def __init__(self, agent: ConnectedAgent) -> None:
                self.agent = agent

            async def heartbeat(self, beat: Any, _context: Any, **kwargs: Any) -> bool:
                return await gateway.heartbeat(self.agent, beat)

        class RunnerImpl(proto.Runner.Server):  # type: ignore[misc,name-defined]
            async def version(self, _context: Any, **kwargs: Any) -> tuple[int, str]:
                return protocol_version(), f"circus {__version__}"

            async def register(self, info: Any, builder: Any, _context: Any, **kwargs: Any
                               ) -> tuple[Any, str]:
                agent = await gateway.register(info, builder, peer)
                registered.append(agent)
                on_register()
                return AgentSessionImpl(agent), agent.connection_id

            async def requestPresignedUrls(self, machineId: str, buildId: int,
                                           paths: Any, stepId: int, _context: Any,
                                           **kwargs: Any) -> Any:
                return await gateway.presign(registered, machineId, buildId, paths, stepId)

            async def notifyUploadComplete(self, machineId: str, buildId: int,
                                           narInfo: Any, stepId: int, _context: Any,
                                           **kwargs: Any) -> Any:
                return await gateway.upload_complete(registered, machineId, buildId, narInfo,
                                                     stepId)

        return RunnerImpl()

    def _registered(self, registered: list[ConnectedAgent], machine_id: str) -> ConnectedAgent:
        for agent in registered:
            if agent.facts.machine_id == machine_id and not agent.closed:
                return agent
        raise Refused("refused: no agent with this machine id is registered on this connection")

    @staticmethod
    def require_lease(session: Session, agent: ConnectedAgent, step_id: int,
                      build_id: int) -> None:
        """The database agrees that ``agent`` holds ``step_id``, which ``build_id`` needs."""
        if not holds_lease(session, agent.lease_holder, step_id):
            raise Refused(not_leased(step_id))
        if not waits_for(session, build_id, step_id):
            raise Refused(f"refused: build {build_id} does not need step {step_id}")

    async def presign(self, registered: list[ConnectedAgent], machine_id: str, build_id: int,
                      paths: Any, step_id: int) -> list[dict[str, str]]:
        """Upload URLs for outputs of a step this session holds (of a build needing it)."""
        from circus.cache import presign

        agent = self._registered(registered, machine_id)
        outputs = agent.leased_outputs(step_id)
        if len(paths) > MAX_PRESIGN_REQUESTS:
            raise Refused(f"refused: more than {MAX_PRESIGN_REQUESTS} presign requests")
        requests = [presign.UploadRequest(check_text("storePath", p.storePath, MAX_STORE_PATH),
                                          p.narHash, int(p.narSize)) for p in paths]
        ours = [r for r in requests if r.store_path in outputs]

        def mint(session: Session) -> list[presign.PresignedUpload]:
            self.require_lease(session, agent, step_id, build_id)
            return presign.mint(session, self.settings, build_id, ours,
                                session_id=agent.connection_id) if ours else []

        try:
            minted = iter(await self.db(mint))
            failed = ""
        except CircusError as exc:
            minted, failed = iter(()), exc.message
        except SQLAlchemyError as exc:
            minted, failed = iter(()), f"the runner's database is unavailable: " \
                f"{error_summary(exc)}"
        answers = []
        for request in requests:
            if request.store_path not in outputs:
                answers.append({"storePath": request.store_path,
                                "error": f"not an output of step {step_id}"})
            elif failed:
                answers.append({"storePath": request.store_path, "error": failed})
            else:
                a = next(minted)
                answers.append({"storePath": a.store_path, "narUrl": a.nar_url,
                                "narPath": a.nar_path, "compression": a.compression,
                                "error": a.error or ""})
        return answers

    async def upload_complete(self, registered: list[ConnectedAgent], machine_id: str,
                              build_id: int, nar_info: Any, step_id: int) -> tuple[bool, str]:
        """Verify and record an upload for an output of a step this session holds."""
        from circus.cache import presign

        agent = self._registered(registered, machine_id)
        if nar_info.storePath not in agent.leased_outputs(step_id):
            raise Refused(f"refused: {str(nar_info.storePath)[:200]!r} is not an output of "
                          f"step {step_id}")
        report = presign.UploadReport(
            store_path=nar_info.storePath, nar_hash=nar_info.narHash,
            nar_size=int(nar_info.narSize), compression=nar_info.compression,
            nar_path=nar_info.narPath, file_hash=nar_info.fileHash or None,
            file_size=int(nar_info.fileSize) if nar_info.fileSize else None,
            references=tuple(nar_info.references), deriver=nar_info.deriver or None,
            ca=nar_info.ca or None)
        def record(session: Session) -> None:
            self.require_lease(session, agent, step_id, build_id)
            presign.verify_and_record(session, self.settings, build_id, report,
                                      session_id=agent.connection_id)

        try:
            await self.db(record)
        except CircusError as exc:
            return False, exc.message
        except SQLAlchemyError as exc:
            return False, f"the runner's database is unavailable: {error_summary(exc)}"
        return True, ""

    async def handle_connection(self, stream: Any, protocol: Any) -> None:
        import capnp

        transport = protocol.transport
        peername = transport.get_extra_info("peername") if transport else None
        ssl_object = transport.get_extra_info("ssl_object") if transport else None
        peer = PeerInfo(
            address=f"{peername[0]}:{peername[1]}" if peername else "?",
            tls=ssl_object is not None,
            client_cn=client_cert_cn(ssl_object.getpeercert()) if ssl_object else None)
        if len(self.agents) >= self.rpc.max_connections:
            log.warning("refusing connection from %s: max_connections reached", peer.address)
            stream.close()
            return
        if self.unregistered >= self.rpc.max_unregistered:
            log.warning("refusing connection from %s: %d connections have not registered yet "
                        "(queue_runner.rpc.max_unregistered)", peer.address, self.unregistered)
            stream.close()
            return
        registered: list[ConnectedAgent] = []
        pending = _Unregistered(self)

        def on_register() -> None:
            pending.release()
            for agent in registered:
                agent.close_connection = stream.close

        server = capnp.TwoPartyServer(
            stream, bootstrap=self.bootstrap(peer, registered, on_register),
            traversal_limit_in_words=TRAVERSAL_LIMIT_WORDS)
        disconnected = asyncio.ensure_future(server.on_disconnect())
        try:
            # until it registers, a connection only costs us: it gets a few seconds
            done, _ = await asyncio.wait({disconnected},
                                         timeout=self.rpc.register_timeout_secs)
            if not done and not registered:
                log.warning("closing connection from %s: no registration within %ss",
                            peer.address, self.rpc.register_timeout_secs)
                stream.close()
            pending.release()
            await disconnected
        except Exception:  # a broken connection ends like a closed one
            log.debug("connection from %s ended with an error", peer.address, exc_info=True)
        finally:
            pending.release()
            if not disconnected.done():
                disconnected.cancel()
            for agent in registered:
                try:
                    await self.drop(agent)
                except Exception:   # raised here, it would abort the process (KJ)
                    log.exception("dropping agent %s failed", agent.facts.name)

    async def serve(self, host: str, port: int) -> None:
        import capnp

        loop = asyncio.get_running_loop()

        def protocol_factory() -> Any:
            holder: dict[str, Any] = {}

            def on_connect(stream: Any) -> Any:
                return self.handle_connection(stream, holder["protocol"])

            holder["protocol"] = capnp.AsyncIoStream._connect(on_connect)
            return holder["protocol"]

        await self.db(lambda s: session_rows.mark_all_disconnected(s, self.name))
        self.server = await loop.create_server(
            protocol_factory, host, port, ssl=server_ssl_context(self.rpc))
        log.info("agent gateway listening on %s:%s (%s)", host, port,
                 "TLS" if self.rpc.tls.enabled else "plain TCP")

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])
