"""Agents on other "hosts" (network namespaces, each with its own Nix store): a host cut
off the network mid-build and an agent killed with -9 mid-build. Their steps are handed
back and finished by the other agent, each exactly once, and no build is lost.

The gateway listens on 0.0.0.0 (the hosts reach it at their ``main_address``); the
agents heartbeat every 0.5 s, and the gateway drops an agent silent for
``HEARTBEAT_TTL`` seconds (a cut link never closes a TCP connection).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from circus.common.enums import BuildStatus
from tests.agents.conftest import TOKEN_DIGEST, write_agent_config
from tests.agents.test_integration import connected, wait_builds
from tests.helpers.audit import finish_counts
from tests.helpers.daemons import Daemon, circus_command, wait_until
from tests.helpers.net import free_port, wait_for_port
from tests.helpers.netns import NetnsHost, network_host
from tests.queue_runner.daemons import runner_daemon
from tests.queue_runner.factories import FIXTURES, instantiate, make_builds

pytestmark = pytest.mark.slow

DAG = FIXTURES / "dag.nix"
#: seconds of silence after which the gateway drops an agent (production: 60)
HEARTBEAT_TTL = 3
#: the DAG: 3 chains of 3 links, 2 fans over the chains' tips, a top; each sleeps
SHAPE = {"chains": 3, "length": 3, "fans": 2}
WORK_SECS = "3"


@pytest.fixture
def open_gateway(runner_config: Callable[..., dict[str, Any]], tmp_path: Path
                 ) -> Callable[..., Any]:
    """A queue runner without local workers whose gateway the namespace hosts can reach."""

    @contextmanager
    def start(broker_url: str | None = None) -> Iterator[tuple[Daemon, int]]:
        port = free_port()
        overrides: dict[str, Any] = {}
        if broker_url:
            overrides["broker"] = {"url": broker_url}
        config = runner_config(queue_runner={
            "rpc": {"bind": f"0.0.0.0:{port}", "allow_plaintext": True,
                    "auth_tokens": [TOKEN_DIGEST], "heartbeat_ttl_secs": HEARTBEAT_TTL},
            "unsupported_timeout": 60},
            cache={"cache_dir": str(tmp_path / "cache")}, **overrides)
        with runner_daemon("qr-gateway", config, tmp_path, workers=0) as daemon:
            wait_for_port(port, timeout=30)
            yield daemon, port

    return start


def agent_on_host(stack: ExitStack, tmp_path: Path, port: int, name: str
                  ) -> tuple[Daemon, NetnsHost]:
    """An agent alone on a fresh host: its own address, link and /nix."""
    directory = tmp_path / name
    host = stack.enter_context(network_host(nix_store=directory / "nix"))
    config = write_agent_config(directory, port, address=host.main_address, name=name,
                                max_jobs=2, heartbeat_timeout_secs=HEARTBEAT_TTL)
    agent = host.daemon(name, [circus_command("circus-agent"), "--config", str(config)],
                        directory)
    return stack.enter_context(agent), host


def dag(nonce: str, env: dict[str, str]) -> dict[str, str]:
    names = [f"c{c}_{i}" for c in range(SHAPE["chains"]) for i in range(SHAPE["length"])]
    names += [f"fan{k}" for k in range(SHAPE["fans"])] + ["top"]
    return instantiate(names, nonce, env, expr=DAG, args={**SHAPE, "work": WORK_SECS})


def running_on(factory: sessionmaker[Session], name: str) -> list[int]:
    with factory() as session:
        return list(session.execute(text(
            "SELECT id FROM steps WHERE state = 'running' AND machine = :m ORDER BY id"),
            {"m": name}).scalars())


def released(factory: sessionmaker[Session], name: str, step_ids: list[int]) -> bool:
    """None of ``step_ids`` runs on ``name`` any more."""
    return not set(step_ids) & set(running_on(factory, name))


def building_on(factory: sessionmaker[Session], agent: Daemon, name: str) -> list[int]:
    """The steps leased to the agent that it has accepted (it is building them)."""
    log = agent.log()
    return [s for s in running_on(factory, name) if f"accepted step {s} " in log]


def done_step(factory: sessionmaker[Session], step_id: int) -> tuple[str, str | None]:
    with factory() as session:
        row = session.execute(text("SELECT state, machine FROM steps WHERE id = :id"),
                              {"id": step_id}).one()
    return row.state, row.machine


def check_exactly_once(factory: sessionmaker[Session], drvs: dict[str, str],
                       build_ids: list[int]) -> dict[str, int]:
    """Every build succeeded and finished once; one step per derivation, finished once.
    Returns the steps per machine."""
    with factory() as session:
        conn = session.connection()
        steps = session.execute(text(
            "SELECT id, drv_path, state, status, machine FROM steps WHERE drv_path = ANY(:d)"),
            {"d": list(drvs.values())}).all()
        step_finishes = finish_counts(conn, "step")
        build_finishes = finish_counts(conn, "build")
    assert sorted(s.drv_path for s in steps) == sorted(drvs.values())
    assert {(s.state, s.status) for s in steps} == {("done", int(BuildStatus.succeeded))}
    assert {step_finishes.get(s.id) for s in steps} == {1}, step_finishes
    assert {build_finishes.get(b) for b in build_ids} == {1}, build_finishes
    per_machine: dict[str, int] = {}
    for s in steps:
        per_machine[s.machine] = per_machine.get(s.machine, 0) + 1
    return per_machine


@dataclass
class MidBuild:
    """Two agents, each on its own host, building the DAG; the first one holds
    ``lost`` (steps it has accepted and is building) when the fault is to strike."""

    runner: Daemon
    agent: Daemon
    host: NetnsHost
    other: str
    lost: list[int]
    build_ids: list[int]


@contextmanager
def mid_build(open_gateway: Callable[..., Any], committed_db: sessionmaker[Session],
              drvs: dict[str, str], tmp_path: Path, names: tuple[str, str],
              broker_url: str | None = None) -> Iterator[MidBuild]:
    """The DAG's builds queued with both agents connected, a moment into a step on the
    first agent's host."""
    with open_gateway(broker_url) as (runner, port), ExitStack() as stack:
        agent, host = agent_on_host(stack, tmp_path, port, names[0])
        agent_on_host(stack, tmp_path, port, names[1])
        wait_until(lambda: connected(committed_db) == sorted(names), timeout=60,
                   message="both agents connected")
        with committed_db() as session:
            builds = make_builds(session, drvs)
        wait_until(lambda: building_on(committed_db, agent, names[0]) != [], timeout=60,
                   message=f"a step building on {names[0]}")
        time.sleep(1)   # mid-build (steps take WORK_SECS)
        yield MidBuild(runner, agent, host, names[1], running_on(committed_db, names[0]),
                       [b.id for b in builds.values()])


def all_succeeded(committed_db: sessionmaker[Session], scene: MidBuild) -> None:
    result = wait_builds(committed_db, scene.build_ids, timeout=150)
    assert set(result.values()) == {BuildStatus.succeeded}, result


def finished_once_elsewhere(committed_db: sessionmaker[Session], scene: MidBuild,
                            drvs: dict[str, str]) -> dict[str, int]:
    """The lost steps were finished by the other agent, every step and build exactly
    once; returns the steps per host."""
    assert {done_step(committed_db, s)[1] for s in scene.lost} == {scene.other}
    return check_exactly_once(committed_db, drvs, scene.build_ids)


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_a_cut_hosts_steps_are_released_and_finished_by_the_other_host(
        open_gateway: Callable[..., Any], committed_db: sessionmaker[Session],
        finish_audit: None, nix_env: dict[str, str], nonce: str, tmp_path: Path,
        broker: str, request: pytest.FixtureRequest) -> None:
    # the wake-ups that feed the gateway travel on the broker: both kinds carry them
    broker_url = request.getfixturevalue("rabbitmq").url if broker == "rabbitmq" else None
    drvs = dag(nonce, nix_env)
    with mid_build(open_gateway, committed_db, drvs, tmp_path, ("far", "near"),
                   broker_url) as scene:
        lost = scene.lost
        scene.host.cut()
        cut_at = time.monotonic()

        # the gateway hears nothing for HEARTBEAT_TTL seconds, drops the agent, and
        # its steps go back to the queue (then wait for a free slot on the other host)
        wait_until(lambda: released(committed_db, "far", lost), timeout=60, interval=0.1,
                   message="the cut host's steps released")
        released_after = time.monotonic() - cut_at
        # each step the cut host held is finished by the other one
        recovered: dict[int, float] = {}

        def all_recovered() -> bool:
            for step_id in lost:
                if step_id not in recovered and done_step(committed_db, step_id)[0] == "done":
                    recovered[step_id] = time.monotonic() - cut_at
            return len(recovered) == len(lost)

        wait_until(all_recovered, timeout=90, interval=0.2,
                   message="the cut host's steps finished elsewhere")
        all_succeeded(committed_db, scene)
        if broker == "rabbitmq":
            # the gateway's wake-up consumer is subscribed to the class queue on the node
            consumers = dict(line.split() for line in request.getfixturevalue(
                "rabbitmq").ctl("list_queues", "--quiet", "name", "consumers").splitlines()
                if line.strip())
            assert int(consumers.get("build.x86_64-linux", 0)) >= 1, consumers
        # the link comes back: the agent, told its connection is gone, dials again
        scene.host.restore()
        wait_until(lambda: "far" in connected(committed_db), timeout=60,
                   message="the cut agent reconnected")
        log = scene.runner.log()
        agent_log = scene.agent.log()
    per_machine = finished_once_elsewhere(committed_db, scene, drvs)
    assert "agent far silent for" in log
    assert f"agent far disconnected ({len(lost)} step(s) handed back: " in log
    assert "no answer to a heartbeat" in agent_log
    assert released_after < HEARTBEAT_TTL + 5
    print(f"cut host ({broker}): {len(lost)} step(s) released {released_after:.1f} s after "
          "the cut, "
          "finished elsewhere after "
          f"{', '.join(f'{t:.1f}' for t in sorted(recovered.values()))} s "
          f"(heartbeat TTL {HEARTBEAT_TTL} s, steps of {WORK_SECS} s); steps per host "
          f"{per_machine}")


def test_an_agent_killed_mid_build_on_its_host_loses_no_step(
        open_gateway: Callable[..., Any], committed_db: sessionmaker[Session],
        finish_audit: None, nix_env: dict[str, str], nonce: str, tmp_path: Path) -> None:
    drvs = dag(nonce, nix_env)
    with mid_build(open_gateway, committed_db, drvs, tmp_path,
                   ("doomed", "survivor")) as scene:
        scene.agent.kill(signal.SIGKILL)
        killed_at = time.monotonic()
        # nothing of it keeps running on its host (no orphan nix-store or builder)
        wait_until(lambda: scene.host.pids() == [], timeout=10,
                   message="no process left on the killed agent's host")
        wait_until(lambda: all(done_step(committed_db, s)[0] == "done" for s in scene.lost),
                   timeout=90, interval=0.2, message="the killed agent's steps finished")
        recovery = time.monotonic() - killed_at
        all_succeeded(committed_db, scene)
    per_machine = finished_once_elsewhere(committed_db, scene, drvs)
    print(f"kill -9: {len(scene.lost)} step(s) finished elsewhere {recovery:.1f} s after the "
          f"kill (steps of {WORK_SECS} s); steps per host {per_machine}")
