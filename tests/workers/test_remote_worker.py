"""Remote Celery build workers: ``circus-worker`` with its own Nix store and no database
password builds through ``/api/v1/workers`` of a real circus-server, woken by the queue
runner's wake-ups on the real broker; and the API's refusals, tried against it.
(A worker stopped, killed or cancelled mid-build: tests/workers/test_remote_worker_faults.py.)"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from circus.common.enums import BuildStatus
from circus.common.nix.derivation import read_derivation
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
    TOKEN,
    api,
    cache_get,
    exported_in_private_store,
    server_and_runner,
    signatures_in,
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
    jobs = ["top", "plain1", "talker", "kvmjob"]
    drvs = instantiate(["dep", *jobs], nonce, nix_env, expr=JOBS)
    # dep is built in the server's store only: top's step needs its output, which the
    # worker can get from the server's cache alone
    subprocess.run(["nix-store", "--realise", drvs["dep"]], env=nix_env, check=True,
                   capture_output=True)
    dep_output = read_derivation(drvs["dep"]).output_paths["out"]
    # the runner has no local workers: only the worker's heartbeat keeps its classes
    # (and the kvm class) from failing as unsupported after 5 s
    with server_and_runner(runner_config, tmp_path, cache_key, unsupported_timeout=5
                           ) as server, ExitStack() as stack:
        worker = stack.enter_context(worker_in_own_store(
            "w1", tmp_path / "w1", server, redis_url, features=("kvm",)))
        wait_until(lambda: ready(worker, "w1"), timeout=60, message="the worker consuming")
        with committed_db() as session:
            builds = make_builds(session, {job: drvs[job] for job in jobs})
        ids = {job: b.id for job, b in builds.items()}
        try:
            result = wait_builds(committed_db, list(ids.values()), timeout=240)
        finally:
            print(worker.log()[-6000:])
        steps = step_rows(committed_db, [drvs[job] for job in jobs])
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
        # the inputs published for the worker are the worker's alone: no .drv file,
        # and no output no build published, for anyone else
        anonymous = [cache_get(server, p).status_code
                     for p in (drvs["top"], drvs["dep"], dep_output)]
        top_log = requests.get(f"{server}/api/v1/builds/{ids['top']}/log", timeout=30)
        talker_log = requests.get(f"{server}/api/v1/builds/{ids['talker']}/log", timeout=30)
        worker_log = worker.log()
    assert set(result.values()) == {BuildStatus.succeeded}, (result, steps)
    # every step ran on the worker, once
    assert len(steps) == len(jobs)
    assert {s.machine for s in steps} == {"w1"}, steps
    assert worker_log.count("building /nix/store/") == len(jobs)
    assert "now consuming class x86_64-linux.kvm" in worker_log
    # the worker's store got the inputs it needed (top's .drv closure, dep's output) and
    # built there; the outputs came back to the server's store
    assert store_has(tmp_path / "w1", dep_output)
    assert store_has(tmp_path / "w1", outputs["top"])
    # the inputs came from the server's /nix-cache, not as an export stream: they carry
    # the cache's signature (an imported path has none; a path built there neither)
    for substituted in (drvs["top"], drvs["dep"], dep_output):
        assert "circus-test-cache-1:" in signatures_in(tmp_path / "w1", substituted), \
            substituted
    assert "circus-test-cache-1:" not in signatures_in(tmp_path / "w1", outputs["top"])
    assert anonymous == [404, 404, 404]
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
        # connected (a heartbeat) under TOKEN: the name is taken for every other token.
        # Its heartbeat row names the worker's host, not the server's
        assert api(server, "/heartbeat", json={"systems": [system], "hostname": "w1-host",
                                               "pid": 4242}).status_code == 200
        with committed_db() as session:
            assert tuple(session.execute(text(
                "SELECT hostname, pid FROM service_heartbeats"
                " WHERE service = 'remote-worker:w1'")).one()) == ("w1-host", 4242)
        taken = api(server, "/heartbeat", token=OTHER_TOKEN, json={"systems": [system]})
        assert taken.status_code == 409
        assert "another credential" in taken.json()["error"]
        assert api(server, "/heartbeat", token=OTHER_TOKEN, name="w2",
                   json={"systems": [system]}).status_code == 200
        with committed_db() as session:
            builds = make_builds(session, drvs)
            session.execute(text("UPDATE projects SET hidden = true WHERE name = 'qr'"))
            session.commit()

        def queued() -> list[int]:
            return [s.id for s in step_rows(committed_db, [drvs["dep"], drvs["plain1"]])
                    if s.state == "queued"]

        wait_until(lambda: len(queued()) == 2, timeout=60, message="steps queued")
        claimed = api(server, "/claim", json={"queue_class": system, "limit": 1}).json()
        [step] = claimed["steps"]
        assert step["drv_path"] in (drvs["dep"], drvs["plain1"])
        others = [s.id for s in step_rows(committed_db, list(drvs.values()))
                  if s.id != step["id"]]

        # a step it does not hold: no log, no outputs, no outcome
        for other in others:
            for path, body in (("log", {"data": b"x"}), ("finish", {"json": {
                    "outcome": "success"}})):
                refused = api(server, f"/steps/{other}/{path}", **body)
                assert refused.status_code == 403, (path, refused.text)
                assert "not leased" in refused.json()["error"]
            assert api(server, f"/steps/{other}/outputs", method="PUT",
                       data=foreign_export).status_code == 403
        assert api(server, "/renew", json={"step_ids": [step["id"], *others]}
                   ).json()["lost"] == sorted(others)
        # a batch (upload or report) naming one step it does not hold beside its own is
        # refused whole: nothing read or imported, nothing recorded, its own step still
        # running under its lease
        batch = api(server, "/outputs", method="PUT",
                    params={"step": [step["id"], others[0]]}, data=foreign_export)
        assert batch.status_code == 403, batch.text
        assert "not leased" in batch.json()["error"]
        assert not valid_here(foreign_path)
        report = api(server, "/finish", json={"reports": [
            {"step_id": step["id"], "outcome": "success"},
            {"step_id": others[0], "outcome": "success"}]})
        assert report.status_code == 403, report.text
        assert "not leased" in report.json()["error"]
        [row] = step_rows(committed_db, [step["drv_path"]])
        assert (row.state, row.worker.startswith("remote:w1:")) == ("running", True), row

        # inputs come from /nix-cache, where the claim published them, signed. The
        # project is hidden: anonymous callers get nothing; the worker's name and token
        # as Basic (netrc) credentials get the input closure of the steps it holds
        mine = step["drv_path"]
        assert cache_get(server, mine).status_code == 404
        answer = cache_get(server, mine, auth=("w1", TOKEN))
        assert answer.status_code == 200, answer.text
        assert f"StorePath: {mine}" in answer.text
        assert "Sig: circus-test-cache-1:" in answer.text
        assert answer.headers["Cache-Control"] == "private, no-store"
        [nar_url] = [line.split(": ", 1)[1] for line in answer.text.splitlines()
                     if line.startswith("URL: ")]
        assert cache_get(server, nar_url, auth=("w1", TOKEN)).status_code == 200
        assert cache_get(server, nar_url).status_code == 404
        # another worker's step is not w1's to fetch, under its own name or w2's
        [theirs] = api(server, "/claim", token=OTHER_TOKEN, name="w2",
                       json={"queue_class": system}).json()["steps"]
        assert cache_get(server, theirs["drv_path"], auth=("w2", OTHER_TOKEN)
                         ).status_code == 200
        assert cache_get(server, theirs["drv_path"], auth=("w1", TOKEN)).status_code == 404
        assert cache_get(server, theirs["drv_path"], auth=("w2", TOKEN)).status_code == 404
        # a wrong token is an anonymous caller
        assert cache_get(server, mine, auth=("w1", "guess-" + "x" * 40)).status_code == 404
        # a worker token is no API key: the hidden project's own cache stays shut
        assert cache_get(server, mine, auth=("w1", TOKEN), prefix="/projects/qr/nix-cache"
                         ).status_code == 401

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
                api(server, "/heartbeat", json={"systems": [system],
                                                "hostname": "no/slashes"}),
                api(server, f"/steps/{step['id']}/finish", json={"outcome": "hacked"}),
                api(server, "/finish", json={"reports": [
                    {"step_id": step["id"], "outcome": "aborted"},
                    {"step_id": step["id"], "outcome": "success"}]}),
                api(server, "/finish", json={"reports": []}),
                api(server, "/outputs", method="PUT", params={"step": "all"}, data=b""),
                api(server, f"/steps/{step['id']}/log", data=b"x" * (1024 * 1024 + 1))):
            assert answer.status_code == 400, answer.text
            assert answer.json()["error"]
        assert api(server, "/claim", data=b"{not json",
                   headers={"Content-Type": "application/json"}).status_code == 400

        # an upload carrying a path that is not the step's output (here a batch upload
        # naming only its own step): nothing is imported, the step ends aborted without
        # another attempt
        upload = api(server, "/outputs", method="PUT", params={"step": [step["id"]]},
                     data=foreign_export)
        assert upload.status_code == 403
        assert "is not an output of step" in upload.json()["error"]
        assert not valid_here(foreign_path)
        [row] = step_rows(committed_db, [step["drv_path"]])
        assert row.state == "done", row
        assert row.status == BuildStatus.aborted, row
        assert "is not an output of step" in row.error_message
        # and the worker holds nothing any more, not even the right to its inputs
        assert api(server, f"/steps/{step['id']}/log", data=b"late").status_code == 403
        assert cache_get(server, mine, auth=("w1", TOKEN)).status_code == 404
        assert builds
