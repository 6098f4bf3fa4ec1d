"""Circus on RabbitMQ: a whole instance whose Celery broker is a private RabbitMQ node."""

from __future__ import annotations

import secrets
import signal
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from circus.common.db import normalise_url
from circus.common.localservices import PrivatePostgres
from tests.helpers.circus_up import Client, health, start
from tests.helpers.daemons import wait_until
from tests.helpers.gitrepo import GitRepo
from tests.helpers.net import free_port
from tests.helpers.rabbitmq import RabbitNode

pytestmark = pytest.mark.slow


def two_job_flake(nonce: str) -> str:
    """``top`` needs ``base``: two steps, one after the other."""
    return f"""{{
  outputs = {{ self }}:
    let
      job = name: deps: derivation {{
        name = "rabbit-${{name}}";
        system = "x86_64-linux";
        builder = "/bin/sh";
        args = [ "-c" ("export PATH=/usr/bin:/bin; echo built ${{name}} {nonce}; "
          + "echo {nonce} ${{toString deps}} > $out") ];
      }};
      base = job "base" [ ];
      top = job "top" [ base ];
    in {{ hydraJobs = {{ inherit base top; }}; }};
}}
"""


def test_a_build_triggered_over_the_api_runs_on_a_rabbitmq_broker(rabbitmq: RabbitNode,
                                                                  up_root: Path) -> None:
    # up_root: reachable by the postgres user of circus up's private cluster; the
    # instance is removed afterwards, its daemon logs kept in tmp_path
    root = up_root
    state = root / "state"
    repo = GitRepo(state / "demo-repo")
    repo.commit({"flake.nix": "{ outputs = { self }: { hydraJobs = { }; }; }\n"},
                message="no jobs yet")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    up, password, _ = start(state, port, root, extra_env={
        "CIRCUS_BROKER__URL": rabbitmq.url, "CIRCUS_QUEUE_RUNNER__WORKERS": "2"})
    engine = create_engine(normalise_url(PrivatePostgres(state / "postgres").url("circus")),
                           poolclass=NullPool)
    try:
        client = Client(base, password)
        assert health(base)["broker"]["ok"]

        def evaluations() -> list[str]:
            with engine.connect() as conn:
                return list(conn.execute(text(
                    "SELECT status FROM evaluations ORDER BY id")).scalars())

        wait_until(lambda: evaluations() == ["completed"], timeout=60, interval=0.25,
                   message="the first (empty) evaluation")
        nonce = secrets.token_hex(6)
        repo.commit({"flake.nix": two_job_flake(nonce)}, message="two jobs")
        triggered = time.monotonic()
        client.post("/api/v1/evaluations/trigger", {"project": "demo", "jobset": "main"})

        def builds() -> dict[str, str]:
            return {b["job_name"]: b["status"]
                    for b in client.get("/api/v1/builds?limit=10")["items"]}

        wait_until(lambda: builds() == {"base": "succeeded", "top": "succeeded"},
                   timeout=120, interval=0.5, message=f"both builds succeeded ({builds()})")
        took = time.monotonic() - triggered
        top = next(b for b in client.get("/api/v1/builds?limit=10")["items"]
                   if b["job_name"] == "top")
        log = client.text(f"/api/v1/builds/{top['id']}/log")
        assert log is not None
        assert f"built top {nonce}" in log
        # the work went through this node: Circus's queues live on it
        queues = rabbitmq.ctl("list_queues", "--quiet", "name").split()
        assert any(q.startswith("build.") for q in queues), queues
        assert "eval" in queues, queues
        print(f"RabbitMQ: trigger to two builds succeeded in {took:.1f} s")
    finally:
        engine.dispose()
        assert up.process is not None
        up.process.send_signal(signal.SIGTERM)
        code = up.process.wait(60)
        log_tail = "\n".join(p.read_text(errors="replace")[-3000:]
                             for p in (state / "daemon-logs").glob("*.log"))
    assert code == 0, log_tail
