"""Circus across hosts that share nothing: PostgreSQL, the broker (Redis or a private
RabbitMQ node), circus-server and a dispatcher-only queue runner in the main network
namespace; three ``circus-worker`` hosts, each its own network namespace with its own
address and its own ``/nix``, reaching the server and the broker over TCP only.

A DAG of sleeping derivations runs across them: every step runs on one host, its
inputs travel from the server's store, its outputs travel back and are served signed
from ``/nix-cache``. One host's link is pulled mid-build: the worker there cannot
renew its leases and stops its builds before they lapse (self-fencing), the server
re-leases its steps when they lapse, and the other hosts finish them, each once.
"""

from __future__ import annotations

import hashlib
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
from tests.agents.conftest import store_has
from tests.agents.test_integration import published, valid_here, wait_builds
from tests.agents.test_network_faults import (
    check_exactly_once,
    done_step,
    released,
    running_on,
)
from tests.conftest import KeyPair
from tests.helpers.daemons import Daemon, wait_until
from tests.helpers.net import wait_for_port
from tests.helpers.netns import NetnsHost, network_host
from tests.helpers.tcp_redis import tcp_redis
from tests.helpers.worker_hosts import ready, worker_on_host
from tests.queue_runner.conftest import runner_config  # noqa: F401  (shared fixture)
from tests.queue_runner.daemons import runner_daemon, server_daemon
from tests.queue_runner.factories import FIXTURES, instantiate, make_builds

TOKEN = "multi-host-token-" + "m" * 40
#: seconds a lease lasts without renewal (production: longer); the cut host's steps
#: come back this long after its last renewal
LEASE_SECS = 6
HOSTS = ["far", "near1", "near2"]
#: 3 chains of 2 links, 2 fans over the tips, a top: 9 steps on 4 levels. Each sleeps
#: longer than the cut worker may take to fence itself (< 0.8 lease after the cut),
#: so the fence really stops a running build
SHAPE = {"chains": 3, "length": 2, "fans": 2}
WORK_SECS = "7"

pytestmark = pytest.mark.slow


@contextmanager
def broker_of(kind: str, request: pytest.FixtureRequest, tmp_path: Path
              ) -> Iterator[Callable[[str], str]]:
    """The broker's URL as seen from an address (``127.0.0.1`` for the main namespace)."""
    if kind == "rabbitmq":
        yield request.getfixturevalue("rabbitmq").url_for
        return
    with tcp_redis(tmp_path / "redis") as redis:
        yield redis.url_for


@contextmanager
def server_and_dispatcher(runner_config: Callable[..., dict[str, Any]],  # noqa: F811
                          tmp_path: Path, cache_key: KeyPair, broker_url: str
                          ) -> Iterator[tuple[int, Daemon]]:
    """circus-server on 0.0.0.0 (the hosts reach it at their main_address) and a queue
    runner without local workers; yields the server's port and the server."""
    config = runner_config(
        broker={"url": broker_url},
        queue_runner={"unsupported_timeout": 60, "lease_secs": LEASE_SECS},
        signing={"enabled": True, "key": cache_key.secret},
        cache={"cache_dir": str(tmp_path / "cache")},
        remote_workers={"auth_tokens": [hashlib.sha256(TOKEN.encode()).hexdigest()]},
        server={"secret_key": "s" * 40, "workers": 2, "rate_limit_storage": "memory://",
                "require_api_key_for_reads": False})
    server, port = server_daemon(config, tmp_path, host="0.0.0.0")
    with runner_daemon("qr-dispatch", config, tmp_path, workers=0), server:
        wait_for_port(port, timeout=60)
        yield port, server


def building(worker: Daemon, drv_path: str) -> bool:
    return f"building {drv_path}" in worker.log()


def beat_since(factory: sessionmaker[Session], name: str, since: float) -> bool:
    with factory() as session:
        return bool(session.execute(text(
            "SELECT 1 FROM service_heartbeats WHERE service = :s "
            "AND last_heartbeat > to_timestamp(:t)"),
            {"s": f"remote-worker:{name}", "t": since}).first())


def processes_named(worker: Daemon, names: set[str]) -> list[str]:
    """The worker's descendants whose command is one of ``names`` (Nix's sandboxed
    builders live in namespaces of their own, but stay the worker's descendants)."""
    parents: dict[int, int] = {}
    comms: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm, rest = (entry / "stat").read_text().rsplit(")", 1)
        except OSError:
            continue
        parents[int(entry.name)] = int(rest.split()[1])
        comms[int(entry.name)] = comm.split("(", 1)[1]
    found = []
    for pid, comm in comms.items():
        ancestor = parents.get(pid)
        while ancestor and ancestor != worker.pid:
            ancestor = parents.get(ancestor)
        if ancestor == worker.pid and comm in names:
            found.append(f"{pid}:{comm}")
    return found


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_a_dag_across_hosts_survives_a_cut_host(
        runner_config: Callable[..., dict[str, Any]],  # noqa: F811
        committed_db: sessionmaker[Session], finish_audit: None,
        nix_env: dict[str, str], nonce: str, tmp_path: Path, cache_key: KeyPair,
        broker: str, request: pytest.FixtureRequest) -> None:
    names = [f"c{c}_{i}" for c in range(SHAPE["chains"]) for i in range(SHAPE["length"])]
    names += [f"fan{k}" for k in range(SHAPE["fans"])] + ["top"]
    drvs = instantiate(names, nonce, nix_env, expr=FIXTURES / "dag.nix",
                       args={**SHAPE, "work": WORK_SECS})
    started = time.monotonic()
    with broker_of(broker, request, tmp_path) as broker_url, \
            server_and_dispatcher(runner_config, tmp_path, cache_key,
                                  broker_url("127.0.0.1")) as (port, server), \
            ExitStack() as stack:
        hosts: dict[str, NetnsHost] = {}
        workers: dict[str, Daemon] = {}
        for name in HOSTS:
            host = stack.enter_context(network_host(nix_store=tmp_path / name / "nix"))
            hosts[name] = host
            workers[name] = stack.enter_context(worker_on_host(
                host, tmp_path / name, name, port, broker_url(host.main_address), TOKEN))
        for name in HOSTS:
            wait_until(lambda name=name: ready(workers[name], name), timeout=90,
                       message=f"worker {name} consuming")
        with committed_db() as session:
            builds = make_builds(session, drvs)
        ids = [b.id for b in builds.values()]

        # cut while a builder really runs there (not while inputs are still coming)
        wait_until(lambda: processes_named(workers["far"], {"sleep"}) != [], timeout=60,
                   interval=0.05, message="a build running on the host to cut")
        builders_when_cut = processes_named(workers["far"], {"sleep"})
        sleeping_when_cut = len(builders_when_cut)
        lost = running_on(committed_db, "far")
        hosts["far"].cut()
        cut_at = time.monotonic()

        # the worker on the cut host cannot renew: it stops its builds before the
        # leases lapse, and nothing of them keeps running there
        wait_until(lambda: "stopped the builds" in workers["far"].log(), timeout=LEASE_SECS + 5,
                   interval=0.1, message="the cut worker fencing itself")
        fenced_after = time.monotonic() - cut_at
        # the stopped steps are logged when the slot's batch ends, after the killed build
        wait_until(lambda: workers["far"].log().count("; no longer this worker's")
                   >= sleeping_when_cut, timeout=20, interval=0.1,
                   message="the cut worker's stopped steps logged")
        # (by pid: a builder orphaned by its killed nix-store would leave the tree)
        wait_until(lambda: not any(Path(f"/proc/{p.split(':')[0]}").exists()
                                   for p in builders_when_cut)
                   and processes_named(workers["far"], {"nix-store", "sleep"}) == [],
                   timeout=2, message="no build left running on the cut host")
        wait_until(lambda: released(committed_db, "far", lost), timeout=60, interval=0.1,
                   message="the cut host's steps released")
        released_after = time.monotonic() - cut_at
        wait_until(lambda: all(done_step(committed_db, s)[0] == "done" for s in lost),
                   timeout=60, interval=0.2, message="the cut host's steps finished elsewhere")
        recovered_after = time.monotonic() - cut_at
        result = wait_builds(committed_db, ids, timeout=120)
        with committed_db() as session:
            outputs: dict[str, str] = dict(session.execute(text(
                "SELECT b.drv_path, o.path FROM builds b JOIN build_outputs o "
                "ON o.build_id = b.id WHERE b.id = ANY(:ids)"), {"ids": ids}).all())
        wait_until(lambda: published(committed_db, ids) == len(ids), timeout=30,
                   message="outputs published to the cache")

        def narinfo(path: str) -> requests.Response:
            return requests.get(f"http://127.0.0.1:{port}/nix-cache/"
                                f"{Path(path).name.split('-')[0]}.narinfo", timeout=30)

        wait_until(lambda: all(narinfo(p).status_code == 200 for p in outputs.values()),
                   timeout=15, message="narinfos served")
        narinfos = {drv: narinfo(path) for drv, path in outputs.items()}
        if broker == "rabbitmq":
            # the live workers consume the class queue on the node
            consumers = dict(line.split() for line in request.getfixturevalue(
                "rabbitmq").ctl("list_queues", "--quiet", "name", "consumers").splitlines()
                if line.strip())
            assert int(consumers.get("build.x86_64-linux", 0)) >= 2, consumers
        logs = {name: w.log() for name, w in workers.items()}
        # the link comes back: the fenced worker beats again (and can leave gracefully)
        restored_at = time.time()
        hosts["far"].restore()
        wait_until(lambda: beat_since(committed_db, "far", restored_at), timeout=60,
                   interval=0.5, message="the cut worker heard again")
    elapsed = time.monotonic() - started
    assert set(result.values()) == {BuildStatus.succeeded}, (result, server.log()[-3000:])
    per_machine = check_exactly_once(committed_db, drvs, ids)
    assert set(per_machine) <= set(HOSTS), per_machine
    # every derivation was built on exactly one host, except the cut host's, which the
    # cut host started and one other host built again
    with committed_db() as session:
        lost_drvs = set(session.execute(text("SELECT drv_path FROM steps WHERE id = ANY(:i)"),
                                        {"i": lost}).scalars())
    for job, drv in drvs.items():
        built_on = [name for name, log in logs.items() if f"building {drv}" in log]
        if drv in lost_drvs:
            # started on the cut host (or only leased there), then built on one other
            assert len([n for n in built_on if n != "far"]) == 1, (job, built_on)
        else:
            assert len(built_on) == 1, (job, built_on)
    assert {done_step(committed_db, s)[1] for s in lost} <= {"near1", "near2"}
    # the cut worker fenced itself before its leases lapsed on the server, killing
    # builds that were still running (they sleep WORK_SECS), and reported nothing
    assert fenced_after < LEASE_SECS, fenced_after
    assert logs["far"].count(": stopped (cancelled)") >= sleeping_when_cut, \
        logs["far"][-3000:]
    # outputs came back to the server's store and are served signed; the inputs of
    # the top travelled to the host that built it
    assert all(valid_here(p) for p in outputs.values())
    for drv, answer in narinfos.items():
        assert f"StorePath: {outputs[drv]}" in answer.text, (drv, answer.text)
        assert "Sig: circus-test-cache-1:" in answer.text
    top_host = next(name for name, log in logs.items() if f"building {drvs['top']}" in log)
    for fan in ("fan0", "fan1"):
        assert store_has(tmp_path / top_host, read_derivation(drvs[fan]).output_paths["out"])
    print(f"multi-host ({broker}): {len(ids)} steps on {per_machine}; cut host fenced "
          f"{fenced_after:.1f} s, its {len(lost)} step(s) released {released_after:.1f} s "
          f"and finished elsewhere {recovered_after:.1f} s after the cut "
          f"(lease {LEASE_SECS} s); {elapsed:.0f} s in all")
