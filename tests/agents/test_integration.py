"""The queue runner with its gateway and real agents, each with its own Nix store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from circus.common.enums import BuildStatus
from tests.agents.conftest import TOKEN_DIGEST, agent_in_own_store, store_has, write_agent_config
from tests.conftest import KeyPair, S3Server
from tests.helpers.daemons import Daemon, wait_until
from tests.helpers.net import free_port, wait_for_port
from tests.queue_runner.daemons import runner_daemon
from tests.queue_runner.factories import instantiate, make_builds

JOBS = Path(__file__).parent / "fixtures" / "jobs.nix"

pytestmark = pytest.mark.slow


@pytest.fixture
def gateway_runner(runner_config: Callable[..., dict[str, Any]], tmp_path: Path
                   ) -> Callable[..., Any]:
    """A queue runner with the gateway and no local workers: agents build everything."""

    @contextmanager
    def start(rpc: dict[str, Any] | None = None, **runner: Any
              ) -> Iterator[tuple[Daemon, int]]:
        port = free_port()
        config = runner_config(queue_runner={
            "rpc": {"bind": f"127.0.0.1:{port}", "allow_plaintext": True,
                    "auth_tokens": [TOKEN_DIGEST], **(rpc or {})},
            # no local builds, from the config as an agents-only host writes it; the
            # agents' CPU pressure is the shared test host's (other tests): no PSI gate
            "unsupported_timeout": 30, "workers": 0, "psi_threshold": 100, **runner},
            cache={"cache_dir": str(tmp_path / "cache")})
        with runner_daemon("qr-gateway", config, tmp_path) as daemon:
            wait_for_port(port, timeout=30)
            yield daemon, port

    return start


def start_agent(stack: ExitStack, tmp_path: Path, port: int, name: str, *args: str,
                **config: Any) -> Daemon:
    directory = tmp_path / name
    path = write_agent_config(directory, port, name=name, **config)
    return stack.enter_context(agent_in_own_store(name, directory, path, *args))


def gateway_details(factory: sessionmaker[Session]) -> dict[str, Any]:
    """What the ``qr-gateway`` runner's last heartbeat says about its gateway."""
    with factory() as session:
        details = session.execute(text(
            "SELECT details FROM service_heartbeats WHERE service LIKE :s"),
            {"s": "queue-runner-qr-gateway@%"}).scalar_one_or_none()
    return dict((details or {}).get("gateway") or {})


def connected(factory: sessionmaker[Session]) -> list[str]:
    with factory() as session:
        return list(session.execute(text(
            "SELECT name FROM builder_sessions WHERE connected ORDER BY name")).scalars())


def finished(factory: sessionmaker[Session], ids: list[int]) -> dict[int, BuildStatus]:
    with factory() as session:
        rows = session.execute(text("SELECT id, status FROM builds WHERE id = ANY(:ids)"),
                               {"ids": ids}).all()
    return {r.id: BuildStatus(r.status) for r in rows}


def wait_builds(factory: sessionmaker[Session], ids: list[int], timeout: float = 120
                ) -> dict[int, BuildStatus]:
    wait_until(lambda: all(s.is_finished for s in finished(factory, ids).values()),
               timeout=timeout, interval=0.25, message="builds finished")
    return finished(factory, ids)


def machine_of(factory: sessionmaker[Session], drv: str) -> str | None:
    with factory() as session:
        return session.execute(text(
            "SELECT machine FROM steps WHERE drv_path = :d AND state = 'done'"),
            {"d": drv}).scalar()


def published(factory: sessionmaker[Session], build_ids: list[int]) -> int:
    """How many of these builds' outputs the binary cache has recorded."""
    with factory() as session:
        return int(session.execute(text(
            "SELECT count(*) FROM build_outputs o JOIN narinfo_cache n ON n.store_path = o.path "
            "WHERE o.build_id = ANY(:ids)"), {"ids": build_ids}).scalar_one())


def valid_here(path: str) -> bool:
    return subprocess.run(["nix-store", "--check-validity", path],
                          capture_output=True).returncode == 0


def test_capability_routing_strategy_logs_and_outputs(
        gateway_runner: Callable[..., Any], committed_db: sessionmaker[Session],
        nix_env: dict[str, str], nonce: str, tmp_path: Path) -> None:
    jobs = ["top", "plain1", "plain2", "kvmjob", "bigjob", "talker"]
    drvs = instantiate(jobs, nonce, nix_env, expr=JOBS)
    dep_drv = instantiate(["dep"], nonce, nix_env, expr=JOBS)["dep"]
    with gateway_runner() as (runner, port), ExitStack() as stack:
        start_agent(stack, tmp_path, port, "plain", max_jobs=2)
        start_agent(stack, tmp_path, port, "kvm", mandatory_features=["kvm"])
        start_agent(stack, tmp_path, port, "fast", speed_factor=4.0,
                    features=["big-parallel"], max_jobs=2)
        wait_until(lambda: connected(committed_db) == ["fast", "kvm", "plain"], timeout=30,
                   message="three agents connected")
        with committed_db() as session:
            builds = make_builds(session, {j: drvs[j] for j in jobs})
        ids = {job: b.id for job, b in builds.items()}
        # the log streams to the runner while the build runs
        talker_log = Path(tmp_path / "logs")
        wait_until(lambda: any(b"first line" in p.read_bytes()
                               for p in talker_log.rglob("*talker*.log")),
                   timeout=60, message="live log of the talker")
        assert not any(b"second line" in p.read_bytes()
                       for p in talker_log.rglob("*talker*.log"))
        result = wait_builds(committed_db, list(ids.values()))
        wait_until(lambda: published(committed_db, list(ids.values())) == len(jobs),
                   timeout=30, message="outputs published to the cache")
        # the gateway that circus-queue-runner's entry point hands to the daemon reports
        # in the daemon's heartbeat
        wait_until(lambda: gateway_details(committed_db).get("assigned", 0) >= len(jobs),
                   timeout=30, message="the gateway's assignments in the heartbeat")
        details = gateway_details(committed_db)
        print(runner.log()[-4000:])
    assert (details["port"], details["agents"]) == (port, 3), details
    assert set(result.values()) == {BuildStatus.succeeded}, result
    # a kvm step goes only to the kvm agent, big-parallel only where it is supported,
    # and plain work prefers the higher speed factor
    assert machine_of(committed_db, drvs["kvmjob"]) == "kvm"
    assert machine_of(committed_db, drvs["bigjob"]) == "fast"
    assert machine_of(committed_db, drvs["plain1"]) in ("fast", "plain")
    assert machine_of(committed_db, drvs["top"]) is not None
    machines = {machine_of(committed_db, drvs[j]) for j in ("top", "plain1", "plain2",
                                                             "talker")}
    assert "kvm" not in machines
    # outputs came back into the runner's store and are served by its cache
    with committed_db() as session:
        outputs = dict(session.execute(text(
            "SELECT b.job_name, o.path FROM builds b JOIN build_outputs o ON o.build_id = b.id "
            "WHERE b.id = ANY(:ids)"), {"ids": list(ids.values())}).all())
        logs = session.execute(text(
            "SELECT log_path FROM steps WHERE drv_path = :d"), {"d": drvs["talker"]}).scalar()
        cached = set(session.execute(text(
            "SELECT store_path FROM narinfo_cache WHERE store_path = ANY(:p)"),
            {"p": list(outputs.values())}).scalars())
    assert cached == set(outputs.values())
    for job, path in outputs.items():
        assert valid_here(path), job
    assert Path(outputs["top"]).read_text() == f"dep-{nonce}\ntop\n"
    # the dependency was built once (by some agent) and shipped to the top's builder
    top_machine = machine_of(committed_db, drvs["top"])
    assert top_machine is not None
    assert store_has(tmp_path / top_machine, Path(outputs["top"]).read_text() and
                     subprocess.run(["nix-store", "-q", "--outputs", dep_drv],
                                    capture_output=True, text=True).stdout.strip())
    from circus.queue_runner.steps.logs import read_log

    assert b"second line" in read_log(logs)


def test_killed_agent_step_is_rebuilt_elsewhere_exactly_once(
        gateway_runner: Callable[..., Any], committed_db: sessionmaker[Session],
        nix_env: dict[str, str], nonce: str, tmp_path: Path) -> None:
    drvs = instantiate(["slow"], nonce, nix_env, expr=JOBS)
    with gateway_runner() as (runner, port), ExitStack() as stack:
        first = start_agent(stack, tmp_path, port, "first", speed_factor=9.0)
        wait_until(lambda: connected(committed_db) == ["first"], timeout=30,
                   message="first agent connected")
        with committed_db() as session:
            build = make_builds(session, {"slow": drvs["slow"]})["slow"]

        def running_on() -> str | None:
            with committed_db() as session:
                return session.execute(text(
                    "SELECT machine FROM steps WHERE drv_path = :d AND state = 'running'"),
                    {"d": drvs["slow"]}).scalar()

        wait_until(lambda: running_on() == "first", timeout=30, message="step on first")
        start_agent(stack, tmp_path, port, "second")
        wait_until(lambda: "second" in connected(committed_db), timeout=30,
                   message="second agent connected")
        first.kill(signal.SIGKILL)
        result = wait_builds(committed_db, [build.id], timeout=90)
        print(runner.log()[-3000:])
    assert result == {build.id: BuildStatus.succeeded}
    with committed_db() as session:
        steps = session.execute(text(
            "SELECT state, status, machine, attempts FROM steps WHERE drv_path = :d"),
            {"d": drvs["slow"]}).all()
        row = session.execute(text(
            "SELECT status, completed_at FROM builds WHERE id = :id"), {"id": build.id}).one()
        log_path = session.execute(text(
            "SELECT log_path FROM steps WHERE drv_path = :d"), {"d": drvs["slow"]}).scalar()
    # one step, finished once, by the survivor; the build finished once
    assert [(s.state, s.status, s.machine) for s in steps] == [("done", 2, "second")]
    assert row.completed_at is not None
    # counted before the hand-back emptied the agent's steps
    assert "agent first disconnected (1 step(s) handed back: " in runner.log()
    # the log holds both attempts, and says where the first one ended
    from circus.queue_runner.steps.logs import read_log

    lines = read_log(log_path).decode().splitlines()
    lost = ("circus: this attempt was lost with agent 'first' (it disconnected); "
            "the step goes back to the queue")
    assert lost in lines
    assert lines.count("slow start") == 2
    assert lines.index("slow start") < lines.index(lost) < len(lines) - 1 - \
        lines[::-1].index("slow start")


def test_ephemeral_agent_exits_after_max_builds(
        gateway_runner: Callable[..., Any], committed_db: sessionmaker[Session],
        nix_env: dict[str, str], nonce: str, tmp_path: Path) -> None:
    jobs = ["plain1", "plain2", "dep"]
    drvs = instantiate(jobs, nonce, nix_env, expr=JOBS)
    with gateway_runner() as (_, port), ExitStack() as stack:
        os.environ["GITHUB_RUN_ID"] = "4242"
        try:
            agent = start_agent(stack, tmp_path, port, "eph", "--ephemeral",
                                ephemeral={"max_builds": 2, "max_idle_secs": 60})
        finally:
            del os.environ["GITHUB_RUN_ID"]
        with committed_db() as session:
            builds = make_builds(session, {j: drvs[j] for j in jobs})
        assert agent.process is not None
        assert agent.process.wait(90) == 0
        ids = [b.id for b in builds.values()]

        def succeeded() -> int:
            with committed_db() as session:
                return int(session.execute(text(
                    "SELECT count(*) FROM builds WHERE id = ANY(:ids) AND status = 2"),
                    {"ids": ids}).scalar_one())

        # both reported results are recorded although the agent left right after
        wait_until(lambda: succeeded() == 2, timeout=20, message="two builds recorded")
        with committed_db() as session:
            name, ephemeral = session.execute(text(
                "SELECT name, ephemeral FROM builder_sessions")).one()
    assert ephemeral is True
    assert name.startswith("eph-4242-")
    assert succeeded() == 2
    assert "max_builds (2) reached" in agent.log()


def test_json_tracing_lines_of_the_agent_carry_the_step(
        gateway_runner: Callable[..., Any], committed_db: sessionmaker[Session],
        nix_env: dict[str, str], nonce: str, tmp_path: Path) -> None:
    drv = instantiate(["plain1"], nonce, nix_env, expr=JOBS)["plain1"]
    with gateway_runner() as (_, port), ExitStack() as stack:
        agent = start_agent(stack, tmp_path, port, "traced",
                            tracing={"format": "json", "level": "debug"})
        with committed_db() as session:
            build = make_builds(session, {"plain1": drv})["plain1"]
        assert wait_builds(committed_db, [build.id]) == {build.id: BuildStatus.succeeded}
        agent.stop()
    with committed_db() as session:
        step_id = session.execute(text("SELECT id FROM steps WHERE drv_path = :d"),
                                  {"d": drv}).scalar_one()
    # every line the agent wrote is a JSON object (not one text line in between)
    lines = [json.loads(line) for line in agent.log().splitlines() if line.strip()]
    about_step = [line for line in lines if line.get("step_id") == step_id]
    assert {line["message"] for line in about_step} >= {f"accepted step {step_id} ({drv})"}
    assert any(line["level"] == "debug" and line["logger"] == "circus.agent.jobs"
               for line in about_step)
    assert all(line["build_id"] == build.id and line["drv_path"] == drv
               for line in about_step)
    # lines outside a step carry no step's ids
    registered = next(line for line in lines if line["message"].startswith("registered"))
    assert "step_id" not in registered


def test_ephemeral_agents_never_build_for_pull_requests_alone(
        gateway_runner: Callable[..., Any], committed_db: sessionmaker[Session],
        nix_env: dict[str, str], nonce: str, tmp_path: Path) -> None:
    drvs = instantiate(["plain1", "plain2"], nonce, nix_env, expr=JOBS)
    with gateway_runner() as (_, port), ExitStack() as stack:
        start_agent(stack, tmp_path, port, "ci-runner", "--ephemeral",
                    ephemeral={"max_builds": 10, "max_idle_secs": 120})
        wait_until(lambda: connected(committed_db) != [], timeout=30, message="agent up")
        with committed_db() as session:
            pull_request = make_builds(session, {"pr": drvs["plain1"]}, pr_number=7)["pr"]
            branch = make_builds(session, {"main": drvs["plain2"]})["main"]
        assert wait_builds(committed_db, [branch.id]) == {branch.id: BuildStatus.succeeded}
        assert (machine_of(committed_db, drvs["plain2"]) or "").startswith("ci-runner")
        # the pull request's step stays queued while only the ephemeral agent is there
        # (the bridge retries it every sweep, SWEEP_SECS)
        import time

        time.sleep(3)
        assert finished(committed_db, [pull_request.id]) == {
            pull_request.id: BuildStatus.pending}
        with committed_db() as session:
            state = session.execute(text("SELECT state FROM steps WHERE drv_path = :d"),
                                    {"d": drvs["plain1"]}).scalar_one()
        assert state == "queued"
        # a persistent agent takes it
        start_agent(stack, tmp_path, port, "persistent")
        assert wait_builds(committed_db, [pull_request.id]) == {
            pull_request.id: BuildStatus.succeeded}
        assert machine_of(committed_db, drvs["plain1"]) == "persistent"


def test_an_oidc_agent_builds_only_its_repositorys_trusted_jobs(
        gateway_runner: Callable[..., Any], committed_db: sessionmaker[Session],
        nix_env: dict[str, str], nonce: str, tmp_path: Path) -> None:
    from tests.helpers.oidc_issuer import REQUEST_TOKEN, oidc_issuer
    from tests.queue_runner.factories import make_jobset

    drvs = instantiate(["plain1", "plain2", "dep"], nonce, nix_env, expr=JOBS)
    with oidc_issuer() as issuer, ExitStack() as stack:
        rpc = {"oidc": {"issuer": issuer.url, "audiences": ["circus"],
                        "allowed_repositories": ["acme/widget", "acme/other"]}}
        _, port = stack.enter_context(gateway_runner(rpc=rpc))
        with committed_db() as session:
            widget, other = make_jobset(session, "widget"), make_jobset(session, "other")
            session.execute(text(
                "UPDATE projects SET repository_url = CASE name "
                "WHEN 'widget' THEN 'https://github.com/acme/widget.git' "
                "ELSE 'git@github.com:acme/other.git' END"))
            session.commit()
        # the agent asks "GitHub" for its ID token, as in a workflow job
        os.environ.update({"ACTIONS_ID_TOKEN_REQUEST_URL": f"{issuer.url}/token?v=1",
                           "ACTIONS_ID_TOKEN_REQUEST_TOKEN": REQUEST_TOKEN})
        try:
            start_agent(stack, tmp_path, port, "gh-runner", token="",
                        oidc_audience="circus")
        finally:
            del os.environ["ACTIONS_ID_TOKEN_REQUEST_URL"]
            del os.environ["ACTIONS_ID_TOKEN_REQUEST_TOKEN"]
        wait_until(lambda: connected(committed_db) == ["gh-runner"], timeout=30,
                   message="OIDC agent registered")
        with committed_db() as session:
            mine = make_builds(session, {"main": drvs["plain1"]}, jobset=widget)["main"]
            pull = make_builds(session, {"pr": drvs["plain2"]}, jobset=widget,
                               pr_number=3)["pr"]
            theirs = make_builds(session, {"x": drvs["dep"]}, jobset=other)["x"]
            kind = session.execute(text("SELECT auth_kind FROM builder_sessions")).scalar()
        assert kind == "oidc"
        assert wait_builds(committed_db, [mine.id]) == {mine.id: BuildStatus.succeeded}
        import time

        time.sleep(3)
        # another repository's job and the pull request's stay for other builders
        assert finished(committed_db, [pull.id, theirs.id]) == {
            pull.id: BuildStatus.pending, theirs.id: BuildStatus.pending}
        assert "/token" in issuer.requests


def test_agent_uploads_outputs_to_s3_through_presigned_urls(
        runner_config: Callable[..., dict[str, Any]], committed_db: sessionmaker[Session],
        nix_env: dict[str, str], nonce: str, tmp_path: Path, s3_server: S3Server,
        cache_key: KeyPair) -> None:
    drvs = instantiate(["plain1", "top"], nonce, nix_env, expr=JOBS)
    port = free_port()
    config = runner_config(
        queue_runner={"rpc": {"bind": f"127.0.0.1:{port}", "allow_plaintext": True,
                              "auth_tokens": [TOKEN_DIGEST]},
                      "psi_threshold": 100},  # the loaded test host's pressure: no gate
        signing={"enabled": True, "key": cache_key.secret},
        cache={"cache_dir": str(tmp_path / "cache")},
        cache_upload=s3_server.upload_settings(f"agents-{nonce[:8]}"))
    with runner_daemon("qr-s3", config, tmp_path, workers=0) as runner, ExitStack() as stack:
        wait_for_port(port, timeout=30)
        agent = start_agent(stack, tmp_path, port, "uploader")
        wait_until(lambda: connected(committed_db) == ["uploader"], timeout=30,
                   message="agent connected")
        with committed_db() as session:
            builds = make_builds(session, drvs)
        result = wait_builds(committed_db, [b.id for b in builds.values()])
        print(runner.log()[-3000:])
        agent_log = agent.log()
    assert set(result.values()) == {BuildStatus.succeeded}
    with committed_db() as session:
        rows = session.execute(text(
            "SELECT n.store_path, n.storage, n.sig, n.build_id FROM narinfo_cache n "
            "JOIN build_outputs o ON o.path = n.store_path WHERE o.build_id = ANY(:ids)"),
            {"ids": [b.id for b in builds.values()]}).all()
    # the agent uploaded each build's output itself; the runner verified, signed, recorded
    assert len(rows) == 2
    assert {r.storage for r in rows} == {"s3"}
    assert all(r.sig and r.sig.startswith("circus-test-cache-1:") for r in rows)
    assert agent_log.count("uploaded /nix/store/") == 2
