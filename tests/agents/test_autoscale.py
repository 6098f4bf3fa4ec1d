"""GitHub Actions pools: demand, capacity, launches, against a local GitHub API stub."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from circus.common.config import Settings
from circus.common.db import in_transaction
from circus.gateway.autoscale import Autoscaler, launches_needed
from circus.gateway.runtime import GatewayThread
from circus.queue_runner.derivations import DrvCache
from circus.queue_runner.dispatch.stepper import step_builds
from tests.agents.test_registration import raw_register
from tests.helpers.oidc_issuer import OidcIssuer, oidc_issuer
from tests.notifications.stubs import HttpStub, running
from tests.queue_runner.factories import instantiate, make_builds, make_jobset

WORKFLOW = "/repos/acme/widget/actions/workflows/agents.yml/dispatches"


def test_launches_needed() -> None:
    assert launches_needed(0, 0, 0, 1, 4) == 0
    assert launches_needed(3, 0, 0, 1, 4) == 3
    assert launches_needed(9, 0, 0, 1, 4) == 4          # max_inflight
    assert launches_needed(3, 1, 1, 1, 4) == 1          # free slots and launches count
    assert launches_needed(5, 0, 0, 2, 4) == 3          # agents bring max_jobs slots
    assert launches_needed(5, 0, 4, 1, 4) == 0          # already at max_inflight
    assert launches_needed(1, 3, 0, 1, 4) == 0


@pytest.fixture
def issuer() -> Iterator[OidcIssuer]:
    with oidc_issuer() as running_issuer:
        yield running_issuer


@pytest.fixture
def github() -> Iterator[HttpStub]:
    yield from running(HttpStub())


def pool_settings(make_settings: Callable[..., Settings], issuer: OidcIssuer,
                  github: HttpStub, **pool: Any) -> Settings:
    return make_settings(queue_runner={
        "rpc": {"bind": "127.0.0.1:0", "allow_plaintext": True,
                "oidc": {"issuer": issuer.url, "audiences": ["circus"],
                         "allowed_repositories": ["acme/widget"]}},
        "ephemeral_pools": [{
            "name": "gh", "repository": "acme/widget", "workflow": "agents.yml",
            "runner_url": "tls://ci.example.org:7000", "oidc_audience": "circus",
            "github_token": "ghs_secret", "github_api_url": github.url,
            "systems": ["x86_64-linux"], "max_inflight": 2, "scale_up_cooldown_secs": 0,
            **pool}]})


@contextmanager
def gateway_thread(settings: Settings, factory: sessionmaker[Session]
                   ) -> Iterator[GatewayThread]:
    thread = GatewayThread(settings, factory)
    thread.start()
    assert thread.started.wait(20)
    try:
        yield thread
    finally:
        thread.stop()


def queue_work(committed_db: sessionmaker[Session], settings: Settings, nix_env: dict[str, str],
               nonce: str) -> None:
    """Three queued branch steps of acme/widget; a pull request's and another project's
    steps, which the pool's agents could never take."""
    drvs = instantiate(["plain1", "plain2", "dep", "slow", "talker"], nonce, nix_env,
                       expr=Path(__file__).parent / "fixtures" / "jobs.nix")
    with committed_db() as session:
        widget, other = make_jobset(session, "widget"), make_jobset(session, "other")
        session.execute(text("UPDATE projects SET repository_url = CASE name WHEN 'widget' "
                             "THEN 'https://github.com/acme/widget' ELSE 'https://github.com/"
                             "acme/other' END"))
        session.commit()
        make_builds(session, {j: drvs[j] for j in ("plain1", "plain2", "dep")}, jobset=widget,
                    notify=False)
        make_builds(session, {"pr": drvs["slow"]}, jobset=widget, notify=False, pr_number=9)
        make_builds(session, {"x": drvs["talker"]}, jobset=other, notify=False)
    cache = DrvCache()
    while in_transaction(committed_db, lambda s: step_builds(s, settings, cache)).builds:
        pass


def test_a_pool_launches_agents_for_its_queued_work(
        make_settings: Callable[..., Settings], committed_db: sessionmaker[Session],
        issuer: OidcIssuer, github: HttpStub, nix_env: dict[str, str], nonce: str) -> None:
    settings = pool_settings(make_settings, issuer, github, max_inflight=10)
    queue_work(committed_db, settings, nix_env, nonce)
    with gateway_thread(settings, committed_db) as thread:
        scaler = Autoscaler(thread.gateway, settings)
        with committed_db() as session:
            queued = session.execute(text(
                "SELECT count(*) FROM steps WHERE state = 'queued'")).scalar_one()
        assert queued == 5
        # demand: the 3 branch steps of acme/widget, not the pull request's, not the
        # other repository's
        assert thread.call(scaler.round()) == {"gh": 3}
        dispatches = github.under(WORKFLOW)
        assert len(dispatches) == 3
        body = dispatches[0].json()
        assert body["ref"] == "main"
        inputs = body["inputs"]
        assert inputs["runner_url"] == "tls://ci.example.org:7000"
        assert inputs["oidc_audience"] == "circus"
        assert inputs["systems"] == "x86_64-linux"
        assert inputs["max_jobs"] == "1"
        assert inputs["agent_name"].startswith("gh-")
        assert dispatches[0].headers["authorization"] == "Bearer ghs_secret"
        # all launches in flight: nothing more
        assert thread.call(scaler.round()) == {"gh": 0}

        # the first launched agent arrives (its ephemeral name extends agent_name)
        name = f"{inputs['agent_name']}-4242-1-abcdef12"
        assert raw_register(thread.port, authToken=issuer.token(), name=name,
                            ephemeral=True) == ""
        with committed_db() as session:
            pool = session.execute(text("SELECT pool FROM builder_sessions WHERE name = :n"),
                                   {"n": name}).scalar_one()
        assert pool == "gh"
        # raw_register drops its connection at once: 3 steps, 2 launches in flight
        assert thread.call(scaler.round()) == {"gh": 1}
        assert len(github.under(WORKFLOW)) == 4


def test_cooldown_expiry_and_github_errors(
        make_settings: Callable[..., Settings], committed_db: sessionmaker[Session],
        issuer: OidcIssuer, github: HttpStub, nix_env: dict[str, str], nonce: str) -> None:
    settings = pool_settings(make_settings, issuer, github, max_inflight=1,
                             scale_up_cooldown_secs=3600, inflight_ttl_secs=1)
    queue_work(committed_db, settings, nix_env, nonce)
    with gateway_thread(settings, committed_db) as thread:
        scaler = Autoscaler(thread.gateway, settings)
        github.answer(WORKFLOW, 422, times=1)
        assert thread.call(scaler.round()) == {"gh": 0}   # GitHub refused: nothing in flight
        assert len(github.under(WORKFLOW)) == 1
        assert thread.call(scaler.round()) == {"gh": 0}   # cooldown: no retry storm
        scaler.state["gh"].last_launch = float("-inf")
        assert thread.call(scaler.round()) == {"gh": 1}
        time.sleep(1.1)                                   # the launch never showed up
        scaler.state["gh"].last_launch = float("-inf")
        assert thread.call(scaler.round()) == {"gh": 1}
        assert len(github.under(WORKFLOW)) == 3
