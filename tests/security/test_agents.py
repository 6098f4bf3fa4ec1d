"""Issue 12 §6: agents get only their own work.

Each test starts ``circus-queue-runner`` with its gateway the way users do and
attacks it with a raw Cap'n Proto client that registers with a valid token
(``agents_support.RawAgent``, run in its own thread): it asks for uploads of
builds it was never given, streams back paths that are not its step's outputs,
smuggles options into Nix command lines, tries to evict a connected agent, and
holds connections open without registering.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from tests.agents.conftest import TOKEN, TOKEN_DIGEST
from tests.helpers.daemons import Daemon, wait_until
from tests.helpers.net import free_port, wait_for_port
from tests.queue_runner.conftest import runner_config  # noqa: F401  (shared fixture)
from tests.queue_runner.daemons import runner_daemon
from tests.queue_runner.factories import instantiate, make_builds, make_jobset
from tests.security.agents_support import (
    RawAgent,
    export_of,
    fake_store_path,
    refusal,
    run_agent,
)

JOBS = Path(__file__).parents[1] / "agents" / "fixtures" / "jobs.nix"
OTHER_TOKEN = "second-agent-token-" + "q" * 40
OTHER_DIGEST = hashlib.sha256(OTHER_TOKEN.encode()).hexdigest()
REGISTER_TIMEOUT = 1.5
MAX_UNREGISTERED = 3
NAR_HASH = "sha256:" + "0" * 64


@dataclass
class Runner:
    daemon: Daemon
    port: int
    #: every nix-store command line the runner ran, one per line
    nix_store_calls: Path

    def nix_store_argv(self) -> list[str]:
        if not self.nix_store_calls.exists():
            return []
        return self.nix_store_calls.read_text().splitlines()


@pytest.fixture
def start_runner(runner_config: Callable[..., dict[str, Any]],  # noqa: F811
                 tmp_path: Path) -> Iterator[Callable[..., Runner]]:
    """``circus-queue-runner`` with the gateway and no local workers; ``nix-store`` on its
    PATH is a wrapper that records each command line before running the real one."""
    started: list[Daemon] = []

    def start(**rpc: Any) -> Runner:
        wrappers = tmp_path / "bin"
        wrappers.mkdir(exist_ok=True)
        calls = tmp_path / "nix-store-calls"
        real = shutil.which("nix-store")
        assert real is not None
        wrapper = wrappers / "nix-store"
        wrapper.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> "{calls}"\n'
                           f'exec "{real}" "$@"\n')
        wrapper.chmod(0o755)
        port = free_port()
        config = runner_config(queue_runner={
            "rpc": {"bind": f"127.0.0.1:{port}", "allow_plaintext": True,
                    "auth_tokens": [TOKEN_DIGEST, OTHER_DIGEST],
                    "register_timeout_secs": REGISTER_TIMEOUT,
                    "max_unregistered": MAX_UNREGISTERED, **rpc},
            "unsupported_timeout": 30},
            cache={"cache_dir": str(tmp_path / "cache")})
        daemon = runner_daemon("qr-agentsec", config, tmp_path, workers=0,
                               extra_env={"PATH": f"{wrappers}:{os.environ['PATH']}"})
        daemon.start()
        started.append(daemon)
        wait_for_port(port, timeout=30)
        return Runner(daemon, port, calls)

    yield start
    for daemon in started:
        daemon.stop()


def step_row(factory: sessionmaker[Session], step_id: int) -> Any:
    with factory() as session:
        return session.execute(text(
            "SELECT state, status, error_message, worker FROM steps WHERE id = :id"),
            {"id": step_id}).one()


def cached_paths(factory: sessionmaker[Session]) -> list[str]:
    with factory() as session:
        return list(session.execute(text("SELECT store_path FROM narinfo_cache")).scalars())


def valid_here(path: str) -> bool:
    return subprocess.run(["nix-store", "--check-validity", path],
                          capture_output=True).returncode == 0


def test_output_stream_with_a_path_that_is_not_the_steps_output_is_discarded(
        start_runner: Callable[..., Runner], committed_db: sessionmaker[Session],
        nix_env: dict[str, str], nonce: str) -> None:
    runner = start_runner()
    drvs = instantiate(["plain1"], nonce, nix_env, expr=JOBS)
    with committed_db() as session:
        build = make_builds(session, drvs)["plain1"]
    evil = fake_store_path(f"evil-{nonce[:8]}")

    async def attack() -> dict[str, Any]:
        agent = await RawAgent(runner.port, TOKEN).register()
        try:
            job = await agent.next_assignment()
            (output,) = job.expected_outputs
            # the real output (with any content) plus a path the step does not make
            stream = export_of([(output, b"trojan\n"), (evil, b"evil\n")])
            probe = await refusal(job.output_sink.missing([output, evil]))
            missing = (await job.output_sink.missing([output])).missing
            for offset in range(0, len(stream), 4096):
                await job.output_sink.write(stream[offset:offset + 4096])
            closed = await refusal(job.output_sink.close())
            await agent.report(job)
            return {"job": job, "missing": list(missing), "closed": closed, "probe": probe}
        finally:
            agent.close()

    result = run_agent(attack)
    job = result["job"]
    # asking about a path beyond the step's outputs and inputs is refused as well
    assert f"refused: {evil} is neither an output nor an input of step {job.step_id}" in \
        result["probe"]
    assert result["missing"] == job.expected_outputs
    assert f"refused: {evil} is not an output of step {job.step_id}" in result["closed"]
    wait_until(lambda: step_row(committed_db, job.step_id).state == "done", timeout=20,
               message="step finished")
    row = step_row(committed_db, job.step_id)
    # aborted for that reason, no second attempt, nothing imported, published or signed
    assert row.status == 5, row
    assert f"{evil} is not an output of step {job.step_id}" in row.error_message
    assert not valid_here(evil)
    assert not valid_here(job.expected_outputs[0])
    assert cached_paths(committed_db) == []
    with committed_db() as session:
        status = session.execute(text("SELECT status FROM builds WHERE id = :id"),
                                 {"id": build.id}).scalar_one()
    assert status not in (0, 2)  # not pending, not succeeded
    assert not any("--import" in argv for argv in runner.nix_store_argv())


def test_agent_supplied_strings_never_reach_a_nix_command_line(
        start_runner: Callable[..., Runner], committed_db: sessionmaker[Session],
        nix_env: dict[str, str], nonce: str) -> None:
    runner = start_runner()
    drvs = instantiate(["plain1"], nonce, nix_env, expr=JOBS)
    with committed_db() as session:
        make_builds(session, drvs)

    async def attack() -> dict[str, str]:
        agent = await RawAgent(runner.port, TOKEN).register()
        try:
            job = await agent.next_assignment()
            sink = job.output_sink
            answers = {
                "option": await refusal(sink.missing(["--option", "build-hook", "/tmp/x"])),
                "passwd": await refusal(sink.missing(["/etc/passwd"])),
                "mixed": await refusal(sink.missing([job.expected_outputs[0],
                                                     "--delete"])),
                "fetch": await refusal(job.inputs.fetch(["/etc/passwd"], sink)),
                "export": await refusal(sink.write(b"--option\0" * 8)),
            }
            answers["export_close"] = await refusal(sink.close())
            # a well-formed question still gets its answer
            answers["fine"] = str(list((await sink.missing(job.expected_outputs)).missing)
                                  == job.expected_outputs)
            return answers
        finally:
            agent.close()

    answers = run_agent(attack)
    assert "refused: '--option' is not a store path" in answers["option"]
    assert "refused: '/etc/passwd' is not a store path" in answers["passwd"]
    assert "refused: '--delete' is not a store path" in answers["mixed"]
    assert "fetch asked for paths outside the input closure" in answers["fetch"]
    assert answers["export"] == ""  # bytes are only spooled ...
    assert "is not a valid export" in answers["export_close"]  # ... and read before import
    assert answers["fine"] == "True"
    calls = runner.nix_store_argv()
    assert any("--check-validity" in argv for argv in calls)  # the wrapper does record
    for argv in calls:
        for smuggled in ("/etc/passwd", "build-hook", "--delete", "--import"):
            assert smuggled not in argv, argv
        if "--check-validity" in argv:
            assert " -- /nix/store/" in argv, argv  # paths always after `--`


def test_uploads_only_for_outputs_of_a_step_leased_to_this_session(
        start_runner: Callable[..., Runner], committed_db: sessionmaker[Session],
        nix_env: dict[str, str], nonce: str) -> None:
    runner = start_runner()
    drvs = instantiate(["plain1", "plain2"], nonce, nix_env, expr=JOBS)
    with committed_db() as session:
        builds = make_builds(session, drvs)
        outputs: dict[int, str] = dict(session.execute(text(
            "SELECT build_id, path FROM build_outputs")).tuples().all())

    def steps() -> dict[int, int]:
        with committed_db() as session:
            return dict(session.execute(text(
                "SELECT build_id, step_id FROM build_steps")).tuples().all())

    def request(path: str) -> list[dict[str, Any]]:
        return [{"storePath": path, "narHash": NAR_HASH, "narSize": 120}]

    def nar_info(path: str) -> dict[str, Any]:
        return {"storePath": path, "narHash": NAR_HASH, "narSize": 120,
                "compression": "zstd", "narPath": "uploads/x.nar.zst", "references": []}

    async def attack() -> dict[str, Any]:
        agent = await RawAgent(runner.port, TOKEN).register()
        runner_cap, mid = agent.runner, agent.machine_id
        try:
            job = await agent.next_assignment()
            mine = job.build_id
            theirs = next(b.id for b in builds.values() if b.id != mine)
            wait_until(lambda: theirs in steps(), timeout=20, message="steps dispatched")
            their_step = steps()[theirs]
            answers: dict[str, Any] = {"job": job, "theirs": theirs, "their_step": their_step}
            answers["other_step"] = await refusal(runner_cap.requestPresignedUrls(
                mid, theirs, request(outputs[theirs]), their_step))
            answers["other_upload"] = await refusal(runner_cap.notifyUploadComplete(
                mid, theirs, nar_info(outputs[theirs]), their_step))
            answers["other_build"] = await refusal(runner_cap.requestPresignedUrls(
                mid, theirs, request(outputs[theirs]), job.step_id))
            own = await runner_cap.requestPresignedUrls(
                mid, mine, request(outputs[theirs]) + request(outputs[mine]), job.step_id)
            answers["own"] = [(u.storePath, u.narUrl, u.error) for u in own.urls]
            answers["wrong_path_upload"] = await refusal(runner_cap.notifyUploadComplete(
                mid, mine, nar_info(outputs[theirs]), job.step_id))
            await agent.report(job, outcome="buildFailure")
            wait_until(lambda: step_row(committed_db, job.step_id).state == "done",
                       timeout=20, message="step finished")
            answers["after"] = await refusal(runner_cap.requestPresignedUrls(
                mid, mine, request(outputs[mine]), job.step_id))
            answers["after_upload"] = await refusal(runner_cap.notifyUploadComplete(
                mid, mine, nar_info(outputs[mine]), job.step_id))
            return answers
        finally:
            agent.close()

    answers = run_agent(attack)
    job, theirs, their_step = answers["job"], answers["theirs"], answers["their_step"]
    assert f"refused: step {their_step} is not leased to this agent" in answers["other_step"]
    assert f"refused: step {their_step} is not leased to this agent" in answers["other_upload"]
    assert f"refused: build {theirs} does not need step {job.step_id}" in \
        answers["other_build"]
    # per path: another build's output is refused; our own gets past the lease check
    # (and then needs S3, which this runner has not configured)
    (foreign, ours) = answers["own"]
    assert foreign == (outputs[theirs], "", f"not an output of step {job.step_id}")
    assert ours[:2] == (outputs[job.build_id], "")
    assert "presigned uploads need" in ours[2]
    assert f"is not an output of step {job.step_id}" in answers["wrong_path_upload"]
    assert f"refused: step {job.step_id} is not leased to this agent" in answers["after"]
    assert f"refused: step {job.step_id} is not leased to this agent" in \
        answers["after_upload"]
    assert cached_paths(committed_db) == []


def test_a_connected_agent_cannot_be_evicted_with_another_credential(
        start_runner: Callable[..., Runner], committed_db: sessionmaker[Session]) -> None:
    runner = start_runner()

    def connection_id() -> str:
        with committed_db() as session:
            return str(session.execute(text(
                "SELECT connection_id FROM builder_sessions WHERE name = 'solo' "
                "AND connected")).scalar_one())

    async def attack() -> dict[str, Any]:
        first = await RawAgent(runner.port, TOKEN, name="solo").register()
        intruder = RawAgent(runner.port, OTHER_TOKEN, name="solo")
        same = RawAgent(runner.port, TOKEN, name="solo")
        try:
            await intruder.connect()
            answers: dict[str, Any] = {"first": first.session_id}
            answers["intruder"] = await refusal(intruder.register())
            answers["first_alive"] = await first.heartbeat()
            import asyncio

            answers["row"] = await asyncio.to_thread(connection_id)
            # the same credential may take its name over (a reconnect)
            await same.register()
            answers["same"] = same.session_id
            answers["same_alive"] = await same.heartbeat()
            return answers
        finally:
            for agent in (first, intruder, same):
                agent.close()

    answers = run_agent(attack)
    assert "refused: an agent named 'solo' is already connected with another credential" \
        in answers["intruder"]
    assert answers["first_alive"] is True
    assert answers["row"] == answers["first"]
    assert answers["same_alive"] is True
    assert answers["same"] != answers["first"]
    assert "the name is connected with another credential" in runner.daemon.log()


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_unregistered_connections_are_capped_and_must_register_quickly(
        start_runner: Callable[..., Runner], committed_db: sessionmaker[Session]) -> None:
    runner = start_runner()
    time.sleep(0.5)  # the start-up probe's connection is gone
    silent = [socket.create_connection(("127.0.0.1", runner.port), timeout=5)
              for _ in range(MAX_UNREGISTERED)]
    try:
        time.sleep(0.3)  # the gateway has accepted them
        extra = socket.create_connection(("127.0.0.1", runner.port), timeout=5)
        with extra:
            assert _closed_within(extra, 1.0), "a connection beyond the cap stayed open"
        # the silent ones are still open before the timeout, and closed after it
        assert not _closed_within(silent[0], 0.2)
        started = time.monotonic()
        assert all(_closed_within(s, REGISTER_TIMEOUT + 3) for s in silent)
        assert time.monotonic() - started < REGISTER_TIMEOUT + 3
    finally:
        for sock in silent:
            sock.close()

    async def legitimate() -> list[bool]:
        import asyncio

        agent = await RawAgent(runner.port, TOKEN, name="legit").register()
        try:
            beats = [await agent.heartbeat()]
            # registered connections are not subject to the registration timeout
            await asyncio.sleep(REGISTER_TIMEOUT * 2)
            beats.append(await agent.heartbeat())
            return beats
        finally:
            agent.close()

    assert run_agent(legitimate) == [True, True]
    log = runner.daemon.log()
    assert "connections have not registered yet" in log
    assert "no registration within" in log


def test_an_oidc_agent_touches_only_its_repositorys_projects(
        start_runner: Callable[..., Runner], committed_db: sessionmaker[Session],
        nix_env: dict[str, str], nonce: str) -> None:
    from tests.helpers.oidc_issuer import oidc_issuer

    drvs = instantiate(["plain1", "plain2"], nonce, nix_env, expr=JOBS)
    with oidc_issuer() as issuer:
        runner = start_runner(oidc={"issuer": issuer.url, "audiences": ["circus"],
                                    "allowed_repositories": ["acme/widget"]})
        with committed_db() as session:
            widget, other = make_jobset(session, "widget"), make_jobset(session, "other")
            session.execute(text(
                "UPDATE projects SET repository_url = CASE name "
                "WHEN 'widget' THEN 'https://github.com/acme/widget.git' "
                "ELSE 'https://github.com/acme/other.git' END"))
            session.commit()
            theirs = make_builds(session, {"x": drvs["plain2"]}, jobset=other)["x"]

        def their_step_id() -> int | None:
            with committed_db() as session:
                return session.execute(text(
                    "SELECT step_id FROM build_steps WHERE build_id = :b"),
                    {"b": theirs.id}).scalar()

        wait_until(lambda: their_step_id() is not None, timeout=20, message="dispatched")
        their_step = their_step_id()
        assert their_step is not None
        token = issuer.token()

        async def attack() -> dict[str, Any]:
            import asyncio

            agent = await RawAgent(runner.port, token, name="gh-runner").register()
            try:
                answers: dict[str, Any] = {}
                try:
                    await agent.next_assignment(timeout=3)
                    answers["foreign_assigned"] = True
                except TimeoutError:
                    answers["foreign_assigned"] = False
                answers["presign"] = await refusal(agent.runner.requestPresignedUrls(
                    agent.machine_id, theirs.id,
                    [{"storePath": fake_store_path("x"), "narHash": NAR_HASH,
                      "narSize": 1}], their_step))

                def mine() -> int:
                    with committed_db() as session:
                        return make_builds(session, {"main": drvs["plain1"]},
                                           jobset=widget)["main"].id

                answers["mine"] = await asyncio.to_thread(mine)
                answers["job"] = await agent.next_assignment()
                return answers
            finally:
                agent.close()

        answers = run_agent(attack)
    assert answers["foreign_assigned"] is False
    assert f"refused: step {their_step} is not leased to this agent" in answers["presign"]
    assert answers["job"].build_id == answers["mine"]
    assert step_row(committed_db, their_step).state == "queued"
