"""Issue 12 §7 (availability): live-log streams are capped per client and in total, and
login throttling counts failed attempts per account as well as per address.

Two live ``circus-server`` processes: one behind a trusted proxy (127.0.0.1, so
``X-Forwarded-For`` names the client) with low caps, one with the defaults (no trusted
proxy: the header is ignored).
"""

from __future__ import annotations

import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from circus.common.enums import StepState
from circus.common.models import AuditLog, Step
from circus.server.logfiles import step_log
from tests.api.live import ADMIN_KEY, server_env
from tests.helpers.daemons import circus_command, wait_until
from tests.helpers.net import free_port
from tests.security.web_support import (
    PASSWORD,
    World,
    bearer,
    build_malicious_output,
    populate_project,
    world_server,
)

LIMITS = {"CIRCUS_SERVER__RATE_LIMIT_STORAGE": "memory://"}


@pytest.fixture(scope="module")
def proxied(engine: Engine, database_url: str, redis_url: str, nix_env: dict[str, str],
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    state = tmp_path_factory.mktemp("availability")
    built = build_malicious_output(uuid.uuid4().hex)
    with world_server(engine, database_url, redis_url, state, **LIMITS,
                      CIRCUS_SERVER__TRUSTED_PROXIES='["127.0.0.1"]',
                      CIRCUS_SERVER__MAX_LOG_STREAMS="3",
                      CIRCUS_SERVER__MAX_LOG_STREAMS_PER_CLIENT="2",
                      CIRCUS_SERVER__RATE_LIMIT_LOGIN="1000/minute",
                      CIRCUS_SERVER__RATE_LIMIT_LOGIN_ACCOUNT="5/hour") as made:
        with Session(engine, expire_on_commit=False) as session:
            made.ids = populate_project(session, Path(made.settings.logs.log_dir), built,
                                        name="busy", hidden=False)
            session.commit()
        yield made


def stream(world: World, client: str, *, dashboard: bool = False) -> requests.Response:
    build = world.ids["running_build_id"]
    path = f"/build/{build}/log/stream" if dashboard else f"/api/v1/builds/{build}/log/stream"
    return requests.get(world.server.url + path, stream=True, timeout=10,
                        headers={**bearer(ADMIN_KEY), "X-Forwarded-For": client,
                                 "Accept": "text/event-stream"})  # as EventSource asks


def running_log(world: World, engine: Engine) -> Path:
    """The log file the running step of the world's running build is writing."""
    with Session(engine) as session:
        row = session.scalar(select(Step).where(Step.state == StepState.running))
        assert row is not None
        found = step_log(world.settings.logs.log_dir, row.log_path, row.drv_path, row.id)
    assert found is not None
    return found


def assert_refused(response: requests.Response, message: str, *, page: bool = False
                   ) -> None:
    """A 429 naming the cap: JSON from the API, an error page from the dashboard."""
    assert response.status_code == 429, (response.status_code, response.text[:200])
    if page:
        assert response.headers["Content-Type"].startswith("text/html")
        assert message in response.text
    else:
        assert response.headers["Content-Type"].startswith("application/json")
        assert message in response.json()["error"]
    assert int(response.headers["Retry-After"]) > 0


def test_live_log_streams_are_capped_per_client_and_in_total_and_health_still_answers(
        proxied: World, engine: Engine) -> None:
    held: list[requests.Response] = []
    try:
        for _ in range(2):
            held.append(stream(proxied, "203.0.113.1"))
            assert held[-1].status_code == 200
            assert held[-1].headers["Content-Type"].startswith("text/event-stream")
        # the per-client cap, whichever of the two stream routes is asked
        assert_refused(stream(proxied, "203.0.113.1"), "from your address")
        assert_refused(stream(proxied, "203.0.113.1", dashboard=True), "from your address",
                       page=True)
        held.append(stream(proxied, "203.0.113.2", dashboard=True))
        assert held[-1].status_code == 200
        # the total cap: a fresh client is refused too
        assert_refused(stream(proxied, "203.0.113.3"), "on this server")
        started = time.monotonic()
        health = requests.get(proxied.server.url + "/health", timeout=5)
        assert health.status_code in (200, 503)
        assert "status" in health.json()
        assert time.monotonic() - started < 2
        assert requests.get(proxied.server.url + "/api/v1/builds", timeout=5,
                            headers=bearer(ADMIN_KEY)).status_code == 200
        # closing streams gives their slots back (the server sees it at its next write)
        for response in held[:2]:
            response.close()
        log = running_log(proxied, engine)

        def slot_free() -> bool:
            with log.open("a") as handle:
                handle.write("more output\n")
            again = stream(proxied, "203.0.113.3")
            if again.status_code == 200:
                held.append(again)
                return True
            again.close()
            return False

        wait_until(slot_free, timeout=20, interval=0.5, message="a freed stream slot")
    finally:
        for response in held:
            response.close()


def login(world: World, username: str, password: str, client: str) -> requests.Response:
    return requests.post(world.server.url + "/api/v1/auth/login", timeout=10,
                         json={"username": username, "password": password},
                         headers={"X-Forwarded-For": client})


def test_failed_logins_for_one_account_from_many_addresses_are_throttled(
        proxied: World, engine: Engine) -> None:
    for n in range(5):
        refused = login(proxied, "outsider", "wrong-password", f"198.51.100.{n + 1}")
        assert refused.status_code == 401, refused.text
    # a sixth address, a sixth guess: the account's budget is spent, whoever asks
    throttled = login(proxied, "outsider", "wrong-password", "198.51.100.99")
    assert throttled.status_code == 429, throttled.text
    assert throttled.headers["Content-Type"].startswith("application/json")
    assert "Retry-After" in throttled.headers
    assert login(proxied, "Outsider", PASSWORD, "198.51.100.100").status_code == 429
    # the dashboard's form draws on the same budget
    browser = requests.Session()
    form = browser.get(proxied.server.url + "/login", timeout=10)
    token = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
    assert token is not None
    page = browser.post(proxied.server.url + "/login", timeout=10, allow_redirects=False,
                        data={"csrf_token": token.group(1), "username": "outsider",
                              "password": PASSWORD},
                        headers={"X-Forwarded-For": "198.51.100.101"})
    assert page.status_code == 429, page.text[:300]
    # other accounts are not affected, and successful logins do not count
    for _ in range(6):
        assert login(proxied, "member", PASSWORD, "198.51.100.1").status_code == 200
    # the audit log names the client the trusted proxy forwarded for, not the proxy
    assert {"198.51.100.1", "198.51.100.5"} <= failed_login_addresses(engine, "outsider")
    assert "127.0.0.1" not in failed_login_addresses(engine, "outsider")


def failed_login_addresses(engine: Engine, name: str) -> set[str | None]:
    with Session(engine) as session:
        return set(session.scalars(select(AuditLog.remote_addr).where(
            AuditLog.action == "auth.login_failed", AuditLog.target == f"user:{name}")))


@pytest.fixture(scope="module")
def direct(engine: Engine, database_url: str, redis_url: str,
           tmp_path_factory: pytest.TempPathFactory, proxied: World) -> Iterator[World]:
    with world_server(engine, database_url, redis_url, tmp_path_factory.mktemp("direct"),
                      **LIMITS, CIRCUS_SERVER__RATE_LIMIT_LOGIN="3/minute") as made:
        yield made


def test_without_trusted_proxies_x_forwarded_for_is_ignored(direct: World,
                                                            engine: Engine) -> None:
    """The default: a client cannot dodge the per-address limit by naming other
    addresses in X-Forwarded-For."""
    for n in range(3):
        assert login(direct, f"nobody{n}", "wrong", f"192.0.2.{n + 1}").status_code == 401
    throttled = login(direct, "nobody9", "wrong", "192.0.2.200")
    assert throttled.status_code == 429, throttled.text
    # nor can it write another address into the audit log
    assert failed_login_addresses(engine, "nobody0") == {"127.0.0.1"}


def test_circus_server_refuses_bad_proxy_stream_and_origin_settings(
        database_url: str, redis_url: str, tmp_path: Path) -> None:
    """Misconfiguration is caught at start, every problem named by its key path."""
    env = server_env(database_url, redis_url, tmp_path, free_port(),
                     CIRCUS_SERVER__TRUSTED_PROXIES='["10.0.0.0/8", "proxy.example"]',
                     CIRCUS_SERVER__MAX_LOG_STREAMS="32",
                     CIRCUS_SERVER__RATE_LIMIT_LOGIN_ACCOUNT="lots",
                     CIRCUS_SERVER__PRODUCTS_ORIGIN="https://files.example.org/sub")
    done = subprocess.run([circus_command("circus-server")], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    for expected in ("server.trusted_proxies.1: not an IP address or network: "
                     "'proxy.example'",
                     "server.max_log_streams: must be below 32",
                     "server.rate_limit_login_account: must look like '10/minute'",
                     "server.products_origin: must be an origin, without a path"):
        assert expected in done.stderr, done.stderr
    assert "trusted_proxies.0" not in done.stderr
