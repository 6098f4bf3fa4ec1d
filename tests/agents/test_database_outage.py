"""The gateway through a PostgreSQL outage (``pg_ctl stop -m fast``) with an agent building.

A real queue runner (gateway on, no local workers) on a PostgreSQL of this test
alone, and a real agent with its own Nix store. While the database is down the
agent keeps its connection (its heartbeats go unrecorded) and ends its builds;
their outcomes cannot be recorded, so the steps are built again later. The
agent's connection ends inside the outage (kill -9): the gateway drops it without
raising in pycapnp's callback (that aborted circus-queue-runner: KJ's "No event
loop is running on this thread") and records the disconnect once PostgreSQL is
back. Every step is finished exactly once, and every build's log holds its
builder's output: the second attempt of a step whose outputs the agent already
has builds nothing (its log is ``nix-store``'s output path alone), and it used to
replace the first attempt's compressed log.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from circus.cli.migrate import upgrade
from circus.common.db import normalise_url
from circus.common.enums import BuildStatus
from circus.common.localservices import PrivatePostgres
from circus.queue_runner.steps.logs import read_log
from tests.agents.conftest import TOKEN_DIGEST, agent_in_own_store, write_agent_config
from tests.agents.test_integration import connected, wait_builds
from tests.helpers.audit import finish_counts, install_finish_audit
from tests.helpers.daemons import Daemon, wait_until
from tests.helpers.net import free_port, wait_for_port
from tests.queue_runner.daemons import runner_daemon
from tests.queue_runner.factories import instantiate, make_builds

JOBS = 4
#: long enough that the outage lands mid-build, short enough that one ends inside it
WORK_SECS = 2.5
#: the steps' lease: a holder that cannot renew it stops its steps after 80 % of it
LEASE_SECS = 12


def jobs_expression(directory: Path) -> Path:
    """``JOBS`` independent jobs; each prints a line naming itself, then sleeps."""
    path = directory / "jobs.nix"
    path.write_text(f"""{{ nonce }}:
let mk = name: derivation {{
  inherit name nonce;
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" ("export PATH=/usr/bin:/bin; echo log of $name $nonce; "
                 + "sleep {WORK_SECS}; echo $name > $out") ];
}};
in builtins.listToAttrs (builtins.genList (i: {{ name = "j${{toString i}}";
                                               value = mk "outage-j${{toString i}}"; }}) {JOBS})
""")
    return path


def building(factory: sessionmaker[Session], agent: Daemon) -> list[int]:
    with factory() as session:
        running = session.execute(text(
            "SELECT id FROM steps WHERE state = 'running' ORDER BY id")).scalars().all()
    log = agent.log()
    return [s for s in running if f"accepted step {s} " in log]


def session_row(factory: sessionmaker[Session], name: str) -> tuple[bool, str]:
    with factory() as session:
        row = session.execute(text(
            "SELECT connected, connection_id FROM builder_sessions WHERE name = :n"),
            {"n": name}).one()
    return bool(row.connected), str(row.connection_id)


def test_a_database_outage_neither_aborts_the_gateway_nor_mixes_up_logs(
        runner_config: Callable[..., dict[str, Any]], own_postgres: PrivatePostgres,
        nix_env: dict[str, str], nonce: str, tmp_path: Path) -> None:
    own_postgres.create_database("circus")
    url = own_postgres.url("circus")
    upgrade(url)
    engine = create_engine(normalise_url(url), poolclass=NullPool)
    factory = sessionmaker(bind=engine, expire_on_commit=False)
    install_finish_audit(engine)
    drvs = instantiate([f"j{i}" for i in range(JOBS)], nonce, nix_env,
                       expr=jobs_expression(tmp_path))
    port = free_port()
    config = runner_config(database={"url": url}, queue_runner={
        "rpc": {"bind": f"127.0.0.1:{port}", "allow_plaintext": True,
                "auth_tokens": [TOKEN_DIGEST]},
        # no lease lapses inside the outage: the steps held then end on the agent
        "lease_secs": LEASE_SECS, "unsupported_timeout": 60},
        cache={"cache_dir": str(tmp_path / "cache")})
    agent_dir = tmp_path / "agent"
    agent_config = write_agent_config(agent_dir, port, name="outage", max_jobs=2,
                                      heartbeat_timeout_secs=3)
    try:
        with runner_daemon("qr-outage", config, tmp_path, workers=0) as runner, \
                ExitStack() as stack:
            wait_for_port(port, timeout=30)
            agent = stack.enter_context(agent_in_own_store("outage", agent_dir, agent_config))
            wait_until(lambda: connected(factory) == ["outage"], timeout=30,
                       message="the agent connected")
            with factory() as session:
                ids = [b.id for b in make_builds(session, drvs).values()]
            wait_until(lambda: len(building(factory, agent)) == 2, timeout=60,
                       interval=0.05, message="two steps building on the agent")
            _, first_connection = session_row(factory, "outage")
            own_postgres.stop()   # pg_ctl stop -m fast
            # heartbeats go unrecorded; a step ends and its result cannot be recorded
            wait_until(lambda: not runner.alive() or "could not record" in runner.log(),
                       timeout=30, interval=0.1, message="a result reported in the outage")
            assert runner.alive(), runner.log()[-5000:]
            # the agent's connection ends while the database is still down
            agent.kill(signal.SIGKILL)
            wait_until(lambda: "agent outage disconnected" in runner.log(), timeout=15,
                       message="the gateway dropped the killed agent")
            assert runner.alive(), runner.log()[-5000:]
            own_postgres.start()
            # the disconnect is recorded once the database is back
            wait_until(lambda: session_row(factory, "outage") == (False, first_connection),
                       timeout=30, interval=0.2, message="the disconnect recorded")
            agent.start()
            result = wait_builds(factory, ids, timeout=120)
            assert runner.alive(), runner.log()[-5000:]
            runner_log, agent_log = runner.log(), agent.log()
    finally:
        engine.dispose()
    print(runner_log[-6000:])
    print(agent_log[-3000:])
    assert "No event loop is running" not in runner_log
    assert set(result.values()) == {BuildStatus.succeeded}, result
    with engine.begin() as conn:
        step_finishes = finish_counts(conn, "step")
        build_finishes = finish_counts(conn, "build")
        steps = conn.execute(text(
            "SELECT s.id, s.log_path, b.job_name FROM steps s "
            "JOIN build_steps bs ON bs.step_id = s.id JOIN builds b ON b.id = bs.build_id "
            "WHERE b.id = ANY(:ids)"), {"ids": ids}).all()
    engine.dispose()
    assert {build_finishes.get(b) for b in ids} == {1}, build_finishes
    assert {step_finishes.get(s.id) for s in steps} == {1}, step_finishes
    for step in steps:
        assert step.log_path, step.job_name
        log = read_log(step.log_path).decode(errors="replace")
        assert f"log of outage-{step.job_name} {nonce}" in log, (step.job_name, log)
        others = [f"outage-j{i} " for i in range(JOBS) if f"j{i}" != step.job_name]
        assert not any(other in log for other in others), (step.job_name, log)

