"""Remote Celery build workers: ``circus-worker`` with its own Nix store and no database
password builds through ``/api/v1/workers`` of a real circus-server, woken by the queue
runner's wake-ups on the real broker; and the API's refusals, tried against it.
(A worker stopped, killed or cancelled mid-build: tests/workers/test_remote_worker_faults.py.)"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from circus.common.enums import BuildStatus
from circus.common.nix.environment import current_system
from tests.agents.conftest import store_has
from tests.agents.test_integration import published, valid_here, wait_builds
from tests.conftest import KeyPair
from tests.helpers.daemons import wait_until
from tests.helpers.worker_hosts import ready
from tests.queue_runner.conftest import runner_config  # noqa: F401  (shared fixture)
from tests.queue_runner.factories import instantiate, make_builds
from tests.workers.support import (
    JOBS,
    OTHER_TOKEN,
    api,
    exported_in_private_store,
    server_and_runner,
    step_rows,
    worker_in_own_store,
)

pytestmark = pytest.mark.slow


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
