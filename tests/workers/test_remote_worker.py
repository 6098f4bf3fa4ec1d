"""Remote Celery build workers: ``circus-worker`` with its own Nix store and no database
password builds through ``/api/v1/workers`` of a real circus-server, woken by the queue
runner's wake-ups on the real broker; and the API's refusals, tried against it."""

from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from circus.common.enums import BuildStatus
from circus.common.nix.derivation import read_derivation
from circus.common.nix.environment import current_system
from circus.queue_runner.service import cancel_build
from tests.agents.conftest import store_has
from tests.agents.test_integration import published, valid_here, wait_builds
from tests.conftest import KeyPair
from tests.helpers.daemons import Daemon, circus_command, wait_until
from tests.helpers.net import free_port, wait_for_port
from tests.helpers.worker_hosts import ready, worker_command, worker_env, write_worker_config
from tests.queue_runner.conftest import runner_config  # noqa: F401  (shared fixture)
from tests.queue_runner.daemons import flatten, runner_daemon
from tests.queue_runner.factories import instantiate, make_builds

ROOT = Path(__file__).resolve().parents[2]
JOBS = ROOT / "tests" / "agents" / "fixtures" / "jobs.nix"
TOKEN = "worker-token-" + "w" * 40
OTHER_TOKEN = "worker-token-" + "o" * 40
DIGESTS = [hashlib.sha256(t.encode()).hexdigest() for t in (TOKEN, OTHER_TOKEN)]

pytestmark = pytest.mark.slow


@contextmanager
def server_and_runner(runner_config: Callable[..., dict[str, Any]],  # noqa: F811
                      tmp_path: Path, cache_key: KeyPair, lease_secs: int = 20,
                      unsupported_timeout: int = 120) -> Iterator[str]:
    """A queue runner without local workers (dispatcher, reconciler) and a circus-server
    (two gunicorn workers) whose /api/v1/workers accepts TOKEN and OTHER_TOKEN; yields
    the server's URL."""
    config = runner_config(
        queue_runner={"unsupported_timeout": unsupported_timeout, "lease_secs": lease_secs},
        signing={"enabled": True, "key": cache_key.secret},
        cache={"cache_dir": str(tmp_path / "cache")},
        remote_workers={"auth_tokens": DIGESTS},
        server={"secret_key": "s" * 40, "workers": 2, "rate_limit_storage": "memory://",
                "require_api_key_for_reads": False})
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CIRCUS_")}
    env.update(flatten(config))
    server = Daemon("circus-server", [circus_command("circus-server"), "--port", str(port)],
                    tmp_path, env=env)
    with runner_daemon("qr-dispatch", config, tmp_path, workers=0), server:
        wait_for_port(port, timeout=60)
        yield f"http://127.0.0.1:{port}"
        print(server.log()[-3000:])


def worker_in_own_store(name: str, directory: Path, server_url: str, broker_url: str,
                        token: str = TOKEN, slots: int = 2, features: tuple[str, ...] = ()
                        ) -> Daemon:
    """A circus-worker whose /nix is a private bind mount: paths really have to travel."""
    (directory / "nix").mkdir(parents=True, exist_ok=True)
    config = write_worker_config(directory, name, server_url, broker_url, token, slots,
                                 features=features)
    inner = " ".join(shlex.quote(a) for a in worker_command(config))
    script = f"mount --bind {shlex.quote(str(directory / 'nix'))} /nix && exec {inner}"
    return Daemon(name, ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                  directory, env=worker_env())


def api(server: str, path: str, token: str = TOKEN, name: str = "w1", **kwargs: Any
        ) -> requests.Response:
    method = kwargs.pop("method", "POST")
    headers = {"Authorization": f"Bearer {token}", "X-Circus-Worker": name,
               **kwargs.pop("headers", {})}
    return requests.request(method, f"{server}/api/v1/workers{path}", headers=headers,
                            timeout=60, **kwargs)


def step_rows(factory: sessionmaker[Session], drvs: list[str]) -> list[Any]:
    with factory() as session:
        return list(session.execute(text(
            "SELECT id, drv_path, state, status, machine, worker, error_message FROM steps "
            "WHERE drv_path = ANY(:drvs) ORDER BY id"), {"drvs": drvs}).all())


def test_a_worker_with_its_own_store_builds_a_dag_through_the_api(
        runner_config: Callable[..., dict[str, Any]],  # noqa: F811
        committed_db: sessionmaker[Session], nix_env: dict[str, str], nonce: str,
        tmp_path: Path, cache_key: KeyPair, redis_url: str) -> None:
    # kvmjob's class (x86_64-linux.kvm) appears only when it is dispatched: the worker
    # learns of it from its heartbeat and subscribes to it
    jobs = ["dep", "top", "plain1", "talker", "kvmjob"]
    drvs = instantiate(jobs, nonce, nix_env, expr=JOBS)
    # the runner has no local workers: only the worker's heartbeat keeps its classes
    # (and the kvm class) from failing as unsupported after 5 s
    with server_and_runner(runner_config, tmp_path, cache_key, unsupported_timeout=5
                           ) as server, ExitStack() as stack:
        worker = stack.enter_context(worker_in_own_store(
            "w1", tmp_path / "w1", server, redis_url, features=("kvm",)))
        wait_until(lambda: ready(worker, "w1"), timeout=60, message="the worker consuming")
        with committed_db() as session:
            builds = make_builds(session, drvs)
        ids = {job: b.id for job, b in builds.items()}
        try:
            result = wait_builds(committed_db, list(ids.values()), timeout=240)
        finally:
            print(worker.log()[-6000:])
        steps = step_rows(committed_db, list(drvs.values()))
        with committed_db() as session:
            outputs: dict[str, str] = dict(session.execute(text(
                "SELECT b.job_name, o.path FROM builds b JOIN build_outputs o "
                "ON o.build_id = b.id WHERE b.id = ANY(:ids)"),
                {"ids": list(ids.values())}).all())
        # published by the finishing request right after the build counts as finished
        wait_until(lambda: published(committed_db, list(ids.values())) == len(jobs),
                   timeout=30, message="outputs published to the cache")

        def narinfo(path: str) -> requests.Response:
            return requests.get(f"{server}/nix-cache/{Path(path).name.split('-')[0]}.narinfo",
                                timeout=30)

        # each server process learns of new paths by NOTIFY: a moment at most
        wait_until(lambda: all(narinfo(p).status_code == 200 for p in outputs.values()),
                   timeout=10, message="narinfos served")
        narinfos = {job: narinfo(path) for job, path in outputs.items()}
        top_log = requests.get(f"{server}/api/v1/builds/{ids['top']}/log", timeout=30)
        talker_log = requests.get(f"{server}/api/v1/builds/{ids['talker']}/log", timeout=30)
        worker_log = worker.log()
    assert set(result.values()) == {BuildStatus.succeeded}, (result, steps)
    # every step ran on the worker, once
    assert len(steps) == len(jobs)
    assert {s.machine for s in steps} == {"w1"}, steps
    assert worker_log.count("building /nix/store/") == len(jobs)
    assert "now consuming class x86_64-linux.kvm" in worker_log
    # the worker's store got the inputs it needed (dep's output for top) and built there;
    # the outputs came back to the server's store
    assert store_has(tmp_path / "w1", outputs["dep"])
    assert store_has(tmp_path / "w1", outputs["top"])
    assert all(valid_here(p) for p in outputs.values())
    # served signed from the server's binary cache
    for job, answer in narinfos.items():
        assert answer.status_code == 200, (job, answer.text)
        assert f"StorePath: {outputs[job]}" in answer.text
        assert "Sig: circus-test-cache-1:" in answer.text
    # the logs streamed to the server, readable through the API
    assert top_log.status_code == 200
    assert "building top" in top_log.text
    assert "first line" in talker_log.text
    assert "second line" in talker_log.text


def exported_in_private_store(directory: Path, content: str) -> tuple[str, bytes]:
    """A store path that exists only in a private store, and its export stream."""
    (directory / "nix").mkdir(parents=True, exist_ok=True)
    source = directory / "payload"
    source.write_text(content)
    script = (f"mount --bind {shlex.quote(str(directory / 'nix'))} /nix && "
              f"p=$(nix-store --add {shlex.quote(str(source))}) && echo $p >&2 && "
              f"nix-store --export $p")
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                           script], capture_output=True, check=True)
    return done.stderr.decode().strip().splitlines()[-1], done.stdout


def test_the_worker_api_refuses_what_a_worker_may_not_do(
        runner_config: Callable[..., dict[str, Any]],  # noqa: F811
        committed_db: sessionmaker[Session], nix_env: dict[str, str], nonce: str,
        tmp_path: Path, cache_key: KeyPair) -> None:
    drvs = instantiate(["dep", "top", "plain1"], nonce, nix_env, expr=JOBS)
    system = current_system()
    foreign_path, foreign_export = exported_in_private_store(tmp_path / "evil",
                                                             f"not an output {nonce}")
    with server_and_runner(runner_config, tmp_path, cache_key) as server:
        # a wrong token gets nothing, not even the classes
        wrong = api(server, "/heartbeat", token="guess-" + "x" * 40,
                    json={"systems": [system]})
        assert wrong.status_code == 401
        assert "token" in wrong.json()["error"]
        assert api(server, "/claim", token="", json={"queue_class": system}
                   ).status_code == 401
        # connected (a heartbeat) under TOKEN: the name is taken for every other token
        assert api(server, "/heartbeat", json={"systems": [system]}).status_code == 200
        taken = api(server, "/heartbeat", token=OTHER_TOKEN, json={"systems": [system]})
        assert taken.status_code == 409
        assert "another credential" in taken.json()["error"]
        assert api(server, "/heartbeat", token=OTHER_TOKEN, name="w2",
                   json={"systems": [system]}).status_code == 200
        with committed_db() as session:
            builds = make_builds(session, drvs)

        def queued() -> list[int]:
            return [s.id for s in step_rows(committed_db, [drvs["dep"], drvs["plain1"]])
                    if s.state == "queued"]

        wait_until(lambda: len(queued()) == 2, timeout=60, message="steps queued")
        claimed = api(server, "/claim", json={"queue_class": system, "limit": 1}).json()
        [step] = claimed["steps"]
        assert step["drv_path"] in (drvs["dep"], drvs["plain1"])
        others = [s.id for s in step_rows(committed_db, list(drvs.values()))
                  if s.id != step["id"]]

        # a step it does not hold: no log, no inputs, no outputs, no outcome
        for other in others:
            for path, body in (("log", {"data": b"x"}), ("inputs", {"json": {
                    "paths": [step["drv_path"]]}}), ("finish", {"json": {
                    "outcome": "success"}})):
                refused = api(server, f"/steps/{other}/{path}", **body)
                assert refused.status_code == 403, (path, refused.text)
                assert "not leased" in refused.json()["error"]
            assert api(server, f"/steps/{other}/outputs", method="PUT",
                       data=foreign_export).status_code == 403
        assert api(server, "/renew", json={"step_ids": [step["id"], *others]}
                   ).json()["lost"] == sorted(others)

        # inputs: only store paths of the step's own closure
        outside = api(server, f"/steps/{step['id']}/inputs",
                      json={"paths": [drvs["top"]]})
        assert outside.status_code == 403
        assert "not in the input closure" in outside.json()["error"]
        not_store = api(server, f"/steps/{step['id']}/inputs",
                        json={"paths": ["/etc/passwd"]})
        assert not_store.status_code == 400
        assert "not a store path" in not_store.json()["error"]
        inside = api(server, f"/steps/{step['id']}/inputs",
                     json={"paths": [step["drv_path"]]})
        assert inside.status_code == 200
        assert step["drv_path"].encode() in inside.content

        # the same name under another token is refused while the first holds steps
        usurper = api(server, "/claim", token=OTHER_TOKEN,
                      json={"queue_class": system})
        assert usurper.status_code == 409
        assert "another credential" in usurper.json()["error"]
        assert api(server, "/heartbeat", token=OTHER_TOKEN,
                   json={"systems": [system]}).status_code == 409

        # malformed requests are 400s that say why, never 500s
        for answer in (
                api(server, "/claim", name="no:colons", json={"queue_class": system}),
                api(server, "/claim", json={"queue_class": "../../etc"}),
                api(server, "/claim", json={"queue_class": system, "limit": "many"}),
                api(server, "/renew", json={"step_ids": "all"}),
                api(server, f"/steps/{step['id']}/inputs", json={"paths": "/nix/store"}),
                api(server, f"/steps/{step['id']}/finish", json={"outcome": "hacked"}),
                api(server, f"/steps/{step['id']}/log", data=b"x" * (1024 * 1024 + 1))):
            assert answer.status_code == 400, answer.text
            assert answer.json()["error"]
        assert api(server, "/claim", data=b"{not json",
                   headers={"Content-Type": "application/json"}).status_code == 400

        # an upload carrying a path that is not the step's output: nothing is imported,
        # the step ends aborted without another attempt
        upload = api(server, f"/steps/{step['id']}/outputs", method="PUT",
                     data=foreign_export)
        assert upload.status_code == 403
        assert "is not an output of step" in upload.json()["error"]
        assert not valid_here(foreign_path)
        [row] = step_rows(committed_db, [step["drv_path"]])
        assert row.state == "done", row
        assert row.status == BuildStatus.aborted, row
        assert "is not an output of step" in row.error_message
        # and the worker holds nothing any more
        assert api(server, f"/steps/{step['id']}/log", data=b"late").status_code == 403
        assert builds


def test_a_stopped_worker_hands_its_step_back_and_a_killed_ones_is_re_leased(
        runner_config: Callable[..., dict[str, Any]],  # noqa: F811
        committed_db: sessionmaker[Session], nix_env: dict[str, str], nonce: str,
        tmp_path: Path, cache_key: KeyPair, redis_url: str) -> None:
    drv = instantiate(["slow"], nonce, nix_env, expr=JOBS)["slow"]

    def running_on() -> str | None:
        rows = step_rows(committed_db, [drv])  # none until the dispatcher made the step
        return str(rows[0].machine) if rows and rows[0].state == "running" else None

    def building(attempt: int) -> bool:
        """The step's log (streamed to the server; attempts append) shows the build's
        ``attempt``-th start."""
        rows = step_rows(committed_db, [drv])
        log = tmp_path / "logs" / Path(drv).name[:2] / f"{Path(drv).name}-{rows[0].id}.log"
        return log.exists() and log.read_bytes().count(b"slow start") >= attempt

    def attempts() -> int:
        with committed_db() as session:
            return int(session.execute(text("SELECT attempts FROM steps WHERE drv_path = :d"),
                                       {"d": drv}).scalar_one())

    with server_and_runner(runner_config, tmp_path, cache_key, lease_secs=6) as server:
        with committed_db() as session:
            [build] = make_builds(session, {"slow": drv}).values()
        # SIGTERM mid-build: the build stops and the step goes back at once, no attempt
        with worker_in_own_store("w1", tmp_path / "w1", server, redis_url) as w1:
            wait_until(lambda: running_on() == "w1" and building(1), timeout=90,
                       message="slow building on w1")
            stopped_at = time.monotonic()
            w1.stop()
        wait_until(lambda: step_rows(committed_db, [drv])[0].state == "queued", timeout=10,
                   message="the step handed back")
        assert time.monotonic() - stopped_at < 10
        assert attempts() == 0
        assert "step 1: handed back" in w1.log()
        # it left on purpose: no stale heartbeat makes /health say "degraded"
        with committed_db() as session:
            assert not session.execute(text(
                "SELECT 1 FROM service_heartbeats WHERE service = 'remote-worker:w1'")).first()
        # kill -9 mid-build: the lease lapses (6 s) and another worker builds it
        with worker_in_own_store("w2", tmp_path / "w2", server, redis_url) as w2:
            wait_until(lambda: running_on() == "w2" and building(2), timeout=90,
                       message="slow building on w2")
            w2.kill()
        with committed_db() as session:
            assert session.execute(text(
                "SELECT 1 FROM service_heartbeats WHERE service = 'remote-worker:w2'")).first()
        with worker_in_own_store("w3", tmp_path / "w3", server, redis_url) as w3:
            result = wait_builds(committed_db, [build.id], timeout=120)
            w3_log = w3.log()
    assert result == {build.id: BuildStatus.succeeded}, w3_log[-3000:]
    [row] = step_rows(committed_db, [drv])
    assert row.machine == "w3"
    assert attempts() == 1  # the lapsed lease counted; the handed-back one did not


def test_a_cancelled_step_stops_building_on_the_worker(
        runner_config: Callable[..., dict[str, Any]],  # noqa: F811
        committed_db: sessionmaker[Session], nix_env: dict[str, str], nonce: str,
        tmp_path: Path, cache_key: KeyPair, redis_url: str) -> None:
    drv = instantiate(["slow"], nonce, nix_env, expr=JOBS)["slow"]
    output = read_derivation(drv).output_paths["out"]
    with server_and_runner(runner_config, tmp_path, cache_key) as server, \
            worker_in_own_store("w1", tmp_path / "w1", server, redis_url) as worker:
        with committed_db() as session:
            [build] = make_builds(session, {"slow": drv}).values()
        wait_until(lambda: any(b"slow start" in p.read_bytes()
                               for p in (tmp_path / "logs").rglob("*slow*.log")),
                   timeout=90, message="slow building on w1")
        with committed_db() as session:
            cancel_build(session, build.id, reason="test")
            session.commit()
        # the renewal answers "lost" (every <= 2 s) and the worker kills the build
        wait_until(lambda: "step 1: stopped (cancelled)" in worker.log(), timeout=15,
                   message="the build stopped on the worker")
        worker_log = worker.log()
    assert "step 1 was taken away; stopping its build" in worker_log
    # killed before the builder wrote its output (it sleeps 6 s first)
    assert not store_has(tmp_path / "w1", output)
    [row] = step_rows(committed_db, [drv])
    assert row.state == "done", row
