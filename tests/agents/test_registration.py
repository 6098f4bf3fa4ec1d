"""Agents registering with the gateway: accepted, refused with a reason, sessions recorded."""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, select
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from circus.common.config import Settings
from circus.common.models import BuilderSession
from circus.gateway.runtime import GatewayThread
from circus.protocol import protocol_version, schema
from tests.agents.conftest import TOKEN, write_agent_config
from tests.helpers.daemons import Daemon, circus_command, wait_until


def agent_config(tmp_path: Path, port: int, token: str = TOKEN, **extra: Any) -> Path:
    return write_agent_config(tmp_path / f"agent{len(list(tmp_path.glob('agent*')))}", port,
                              token, **extra)


def test_agent_registers_and_heartbeats(gateway: GatewayThread, tmp_path: Path,
                                       committed_db: sessionmaker[Session]) -> None:
    config = agent_config(tmp_path, gateway.port, name="alpha", max_jobs=3,
                          features=["kvm"], systems=["x86_64-linux"])
    with Daemon("agent", [circus_command("circus-agent"), "--config", str(config)],
                tmp_path) as agent:
        def row() -> BuilderSession | None:
            with committed_db() as s:
                return s.scalars(select(BuilderSession)).first()

        wait_until(lambda: (r := row()) is not None and r.connected and r.load1 is not None,
                   timeout=20, message="agent connected with a heartbeat")
        session_row = row()
        assert session_row is not None
        assert session_row.name == "alpha"
        assert session_row.max_jobs == 3
        assert session_row.supported_features == ["kvm"]
        assert session_row.proto_version == protocol_version()
        assert (session_row.mem_total or 0) > 0
        machine_id = (config.parent / "work" / "machine-id").read_text().strip()
        assert session_row.machine_id == machine_id
        agent.stop()
        wait_until(lambda: (r := row()) is not None and not r.connected, timeout=10,
                   message="disconnect recorded")


def test_bad_token_is_refused_with_a_reason(gateway: GatewayThread, tmp_path: Path,
                                           committed_db: sessionmaker[Session]) -> None:
    config = agent_config(tmp_path, gateway.port, token="wrong-token-" + "x" * 30)
    agent = Daemon("agent", [circus_command("circus-agent"), "--config", str(config)], tmp_path)
    agent.start()
    assert agent.process is not None
    assert agent.process.wait(30) == 3
    assert "refused: invalid agent token" in agent.log()
    with committed_db() as s:
        assert s.scalars(select(BuilderSession)).first() is None


async def _raw_register(port: int, **overrides: Any) -> str:
    """Register with hand-made AgentInfo; returns the refusal text ('' when accepted)."""
    import capnp

    proto = schema()

    class NullBuilder(proto.Builder.Server):  # type: ignore[misc,name-defined]
        pass

    info = {"hostname": "h", "name": "raw", "machineId": "m" * 32, "systems": ["x86_64-linux"],
            "supportedFeatures": [], "mandatoryFeatures": [], "speedFactor": 1.0,
            "cpuCount": 1, "maxJobs": 1, "protoVersion": protocol_version(),
            "authToken": TOKEN, "ephemeral": False, "agentVersion": "test"}
    info.update(overrides)
    stream = await capnp.AsyncIoStream.create_connection(host="127.0.0.1", port=port)
    client = capnp.TwoPartyClient(stream)
    runner = client.bootstrap().cast_as(proto.Runner)
    try:
        await runner.register(info, NullBuilder())
    except capnp.KjException as exc:
        return str(exc)
    finally:
        stream.close()
    return ""


def raw_register(port: int, **overrides: Any) -> str:
    import capnp

    # in a thread of its own: asyncio.run refuses a thread with a running event loop,
    # and this helper must not depend on what the calling test's thread runs
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(capnp.run(_raw_register(port, **overrides)))
                           ).result()


@pytest.mark.parametrize(("overrides", "reason"), [
    ({"protoVersion": 999}, "refused: protocol version 999 is not supported"),
    ({"name": "n" * 129}, "refused: name is longer than 128 characters"),
    ({"hostname": "h" * 256}, "refused: hostname is longer than 255 characters"),
    ({"systems": [f"s{i}" for i in range(33)]}, "refused: systems has more than 32 entries"),
    ({"supportedFeatures": ["f" * 129]}, "refused: supportedFeatures entry is longer than 128"),
    ({"authToken": "t" * 5000}, "refused: authToken is longer than 4096 characters"),
])
def test_oversize_or_wrong_version_is_refused(gateway: GatewayThread, overrides: dict[str, Any],
                                             reason: str, caplog: pytest.LogCaptureFixture
                                             ) -> None:
    refusal = raw_register(gateway.port, **overrides)
    assert reason in refusal
    assert reason in caplog.text


def test_plaintext_needs_permission(make_settings: Callable[..., Settings],
                                    committed_db: sessionmaker[Session]) -> None:
    settings = make_settings(queue_runner={"rpc": {
        "bind": "127.0.0.1:0", "allow_plaintext": False,
        "auth_tokens": [hashlib.sha256(TOKEN.encode()).hexdigest()]}})
    thread = GatewayThread(settings, committed_db)
    thread.start()
    assert thread.started.wait(20)
    try:
        refusal = raw_register(thread.port)
        assert "refused: credentials over plaintext TCP are not allowed" in refusal
    finally:
        thread.stop()


def test_agent_imports_no_database_driver(tmp_path: Path) -> None:
    """An agent host needs neither SQLAlchemy nor psycopg2: block them and import."""
    script = tmp_path / "probe.py"
    script.write_text(
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('sqlalchemy', 'psycopg2', 'alembic', 'flask'):\n"
        "            raise ImportError(f'blocked {name}')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import circus.agent.main, circus.agent.daemon, circus.agent.jobs, circus.protocol\n"
        "print('ok')\n")
    import subprocess
    import sys

    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          env={**os.environ})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_sessions_and_metrics_show_connected_agents(
        gateway: GatewayThread, tmp_path: Path, committed_db: sessionmaker[Session],
        gateway_settings: Settings) -> None:
    from circus.auth import service as auth_service
    from circus.auth.actor import Actor
    from circus.common.enums import Role
    from circus.server.app import create_app

    config = agent_config(tmp_path, gateway.port, name="visible", max_jobs=2)
    with Daemon("agent", [circus_command("circus-agent"), "--config", str(config)],
                tmp_path):
        def seen() -> bool:
            with committed_db() as s:
                row = s.scalars(select(BuilderSession)).first()
                return row is not None and row.connected and row.load1 is not None

        wait_until(seen, timeout=20, message="agent connected with a heartbeat")
        with committed_db() as session:
            _, secret = auth_service.create_api_key(session, Actor.system("test"),
                                                    name="ops", role=Role.admin)
            session.commit()
        client = create_app(gateway_settings).test_client()
        headers = {"Authorization": f"Bearer {secret}"}
        listed = client.get("/api/v1/admin/builders/sessions/connected", headers=headers)
        metrics = client.get("/metrics", headers=headers).get_data(as_text=True)
    assert listed.status_code == 200
    assert [s["name"] for s in listed.get_json()["items"]] == ["visible"]
    assert listed.get_json()["items"][0]["max_jobs"] == 2
    assert 'circus_agent_current_jobs{agent="visible"} 0.0' in metrics
    assert 'circus_agent_load1{agent="visible"}' in metrics
    assert "circus_agents_connected 1.0" in metrics


async def _two_connections(port: int, closed_first: asyncio.Event,
                           checked: asyncio.Event) -> tuple[str, str]:
    """Register 'twin' twice, then close the first connection; returns both session ids."""
    import capnp

    proto = schema()

    class NullBuilder(proto.Builder.Server):  # type: ignore[misc,name-defined]
        pass

    info = {"hostname": "h", "name": "twin", "machineId": "t" * 32,
            "systems": ["x86_64-linux"], "supportedFeatures": [], "mandatoryFeatures": [],
            "speedFactor": 1.0, "cpuCount": 1, "maxJobs": 1,
            "protoVersion": protocol_version(), "authToken": TOKEN, "ephemeral": False,
            "agentVersion": "test"}
    streams, ids = [], []
    for _ in range(2):
        stream = await capnp.AsyncIoStream.create_connection(host="127.0.0.1", port=port)
        runner = capnp.TwoPartyClient(stream).bootstrap().cast_as(proto.Runner)
        ids.append(str((await runner.register(info, NullBuilder())).sessionId))
        streams.append(stream)
    streams[0].close()  # the old connection goes away late, after the reconnect
    await asyncio.sleep(0.5)  # time for the gateway to notice and record it
    closed_first.set()
    await checked.wait()
    streams[1].close()
    return ids[0], ids[1]


def test_a_stale_disconnect_never_evicts_the_newer_session(
        gateway: GatewayThread, committed_db: sessionmaker[Session]) -> None:
    import capnp

    def row() -> tuple[bool, str | None]:
        with committed_db() as s:
            found = s.scalars(select(BuilderSession).where(BuilderSession.name == "twin")).one()
            return found.connected, found.connection_id

    seen: list[tuple[bool, str | None]] = []

    async def run() -> tuple[str, str]:
        closed_first, checked = asyncio.Event(), asyncio.Event()
        task = asyncio.ensure_future(_two_connections(gateway.port, closed_first, checked))
        await closed_first.wait()
        seen.append(await asyncio.to_thread(row))
        checked.set()
        return await task

    first, second = asyncio.run(capnp.run(run()))
    assert first != second
    assert seen == [(True, second)]


def test_a_gateway_failing_on_its_database_is_retried_not_taken_as_a_refusal(
        gateway_settings: Settings, engine: Engine, committed_db: sessionmaker[Session],
        tmp_path: Path) -> None:
    """The database down at registration (a restart, found by tests/faults) is the
    gateway's failure, not a no: the agent dials again until it is back."""
    unreachable = create_engine(engine.url.set(database="circus_no_such_database"),
                                poolclass=NullPool)
    factory: sessionmaker[Session] = sessionmaker(bind=engine)
    thread = GatewayThread(gateway_settings, factory)
    thread.start()
    assert thread.started.wait(20)
    assert thread.failed is None
    factory.configure(bind=unreachable)   # the database goes away
    config = agent_config(tmp_path, thread.port, name="patient")
    try:
        with Daemon("agent", [circus_command("circus-agent"), "--config", str(config)],
                    tmp_path) as agent:
            wait_until(lambda: agent.log().count("connection to ") >= 3 or not agent.alive(),
                       timeout=30, message="registration failing again and again")
            assert agent.alive(), agent.log()
            assert "the gateway refused this agent" not in agent.log()
            factory.configure(bind=engine)   # the database is back

            def connected() -> list[str]:
                with committed_db() as s:
                    return list(s.scalars(select(BuilderSession.name).where(
                        BuilderSession.connected)))

            wait_until(lambda: connected() == ["patient"], timeout=30,
                       message="registered once the database is back")
    finally:
        thread.stop()
        unreachable.dispose()
