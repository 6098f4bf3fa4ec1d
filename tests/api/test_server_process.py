"""The API served by a real ``circus-server`` (gunicorn) process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from sqlalchemy import Engine

from circus.common.tokens import token_digest
from tests.api.live import ADMIN_KEY, LiveServer, live_server

#: a Prometheus scraper's credential (its digest is in server.metrics_tokens)
SCRAPER_TOKEN = "scraper-token-0123456789abcdef0123"


@pytest.fixture(scope="module")
def server(engine: Engine, database_url: str, redis_url: str,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with live_server(engine, database_url, redis_url, tmp_path_factory.mktemp("live-api"),
                     CIRCUS_SERVER__METRICS_TOKENS=f'["{token_digest(SCRAPER_TOKEN)}"]'
                     ) as running:
        yield running


def test_declarative_admin_key_works_and_reads_need_a_key(server: LiveServer) -> None:
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    assert requests.get(server.url + "/api/v1/projects", timeout=10).status_code == 401
    response = requests.get(server.url + "/api/v1/me", headers=admin, timeout=10)
    assert response.status_code == 200
    assert response.json()["username"] == "root"
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    document = requests.get(server.url + "/api/v1/openapi.json", timeout=10).json()
    assert "/api/v1/projects" in document["paths"]


def test_crud_and_revocation_over_http(server: LiveServer) -> None:
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    created = requests.post(server.url + "/api/v1/projects", headers=admin, timeout=10,
                            json={"name": "live", "repository_url": "file:///nowhere"})
    assert created.status_code == 201
    duplicate = requests.post(server.url + "/api/v1/projects", headers=admin, timeout=10,
                              json={"name": "live"})
    assert duplicate.status_code == 409
    assert duplicate.json()["error"] == "project 'live' already exists"
    key = requests.post(server.url + "/api/v1/api-keys", headers=admin, timeout=10,
                        json={"name": "temp", "role": "read-only"}).json()
    temp = {"Authorization": f"Bearer {key['key']}"}
    assert requests.get(server.url + "/api/v1/projects", headers=temp,
                        timeout=10).json()["total"] == 1
    assert requests.delete(f"{server.url}/api/v1/api-keys/{key['id']}", headers=admin,
                           timeout=10).status_code == 204
    assert requests.get(server.url + "/api/v1/projects", headers=temp,
                        timeout=10).status_code == 401
    audit = requests.get(server.url + "/api/v1/admin/audit-log?action=api_key.revoke",
                         headers=admin, timeout=10).json()
    assert audit["items"][0]["remote_addr"] == "127.0.0.1"
    assert audit["items"][0]["actor"] == "key:live-admin"
    metrics = requests.get(server.url + "/metrics", headers=admin, timeout=10).text
    assert "circus_builds" in metrics


def test_invalid_declarative_config_stops_the_server(engine: Engine, database_url: str,
                                                     redis_url: str, tmp_path: Path) -> None:
    from tests.api.live import server_env
    from tests.helpers.daemons import Daemon, circus_command

    env = server_env(database_url, redis_url, tmp_path, 1, {
        "projects": [{"name": "p", "owner": "nobody"}]})
    daemon = Daemon("bad-server", [circus_command("circus-server")], tmp_path, env=env)
    daemon.start()
    assert daemon.process is not None
    assert daemon.process.wait(60) == 2
    assert "nobody" in daemon.log()


def test_requests_sharing_a_key_never_wait_for_each_other(server: LiveServer,
                                                           engine: Engine) -> None:
    from sqlalchemy import select, update

    from circus.common.models import ApiKey

    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    created = requests.post(server.url + "/api/v1/api-keys", headers=admin, timeout=10,
                            json={"name": "shared-by-ci", "role": "read-only"}).json()
    shared = {"Authorization": f"Bearer {created['key']}"}
    # a read request records the use (it used to be rolled back with the request)
    assert requests.get(server.url + "/api/v1/projects", headers=shared,
                        timeout=10).status_code == 200
    with engine.connect() as connection:
        used = connection.scalar(select(ApiKey.last_used_at).where(ApiKey.id == created["id"]))
    assert used is not None
    # another request holds the key's row (touching it, or a slow one): this one must not
    # queue behind it
    with engine.connect() as connection:
        connection.execute(update(ApiKey).where(ApiKey.id == created["id"])
                           .values(last_used_at=None))
        connection.commit()
        connection.execute(select(ApiKey).where(ApiKey.id == created["id"]).with_for_update())
        answer = requests.get(server.url + "/api/v1/projects", headers=shared, timeout=5)
        assert answer.status_code == 200
        connection.rollback()


def test_health_tells_strangers_the_status_but_not_the_installation(
        server: LiveServer, engine: Engine) -> None:
    """An anonymous or non-admin caller of /health learns whether Circus is up, not the
    host names, versions or error texts an attacker would map the installation with."""
    from circus.common.db import make_session_factory
    from circus.common.heartbeat import beat

    with make_session_factory(engine).begin() as session:
        beat(session, "remote-worker", service="remote-worker:builder7",
             host=("builder7.internal.example", 31337))
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    reader = requests.post(server.url + "/api/v1/api-keys", headers=admin, timeout=10,
                           json={"name": "health-reader", "role": "read-only"})
    assert reader.status_code == 201, reader.text
    reader_key = reader.json()["key"]
    strangers = [{}, {"Authorization": f"Bearer {reader_key}"},
                 {"Authorization": "Bearer not-a-key"}]
    for headers in strangers:
        answer = requests.get(server.url + "/health", headers=headers, timeout=10)
        assert answer.status_code == 200
        body = answer.json()
        assert body["status"] in ("ok", "degraded")
        assert body["database"] == {"ok": True}
        assert body["broker"] == {"ok": True}
        [row] = [d for d in body["daemons"] if d["service"] == "remote-worker:builder7"]
        assert row["fresh"] is True
        assert "builder7.internal.example" not in answer.text
        assert set(row) == {"service", "kind", "fresh", "age_seconds"}
    full = requests.get(server.url + "/health", headers=admin, timeout=10).json()
    [row] = [d for d in full["daemons"] if d["service"] == "remote-worker:builder7"]
    assert row["hostname"] == "builder7.internal.example"
    assert row["version"]


def test_metrics_answer_scrapers_and_admins_not_strangers(
        server: LiveServer, engine: Engine) -> None:
    """/metrics counts every project's builds (hidden ones too) and names the agents'
    hosts: anonymous callers, a read-only key and a wrong token get no figure; the
    scraper's token reads them and nothing else."""
    from circus.common.db import make_session_factory
    from circus.common.models import BuilderSession

    with make_session_factory(engine).begin() as session:
        session.add(BuilderSession(
            machine_id="m-builder7", name="builder7.internal.example",
            hostname="builder7.internal.example", systems=["x86_64-linux"],
            supported_features=[], mandatory_features=[], proto_version=1, connected=True))
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    reader = requests.post(server.url + "/api/v1/api-keys", headers=admin, timeout=10,
                           json={"name": "metrics-reader", "role": "read-only"})
    assert reader.status_code == 201, reader.text
    strangers = [({}, 401), ({"Authorization": "Bearer not-a-key"}, 401),
                 ({"Authorization": f"Bearer {SCRAPER_TOKEN}x"}, 401),
                 ({"Authorization": f"Bearer {reader.json()['key']}"}, 403)]
    for headers, status in strangers:
        answer = requests.get(server.url + "/metrics", headers=headers, timeout=10)
        assert answer.status_code == status, (headers, answer.text[:300])
        assert answer.headers["Content-Type"].startswith("application/json")
        assert "builder7" not in answer.text
        assert "circus_" not in answer.text
    scraper = {"Authorization": f"Bearer {SCRAPER_TOKEN}"}
    for headers in (scraper, admin):
        scraped = requests.get(server.url + "/metrics", headers=headers, timeout=10)
        assert scraped.status_code == 200
        assert 'circus_agent_load1{agent="builder7.internal.example"}' in scraped.text
        assert "circus_builds{" in scraped.text
    # the scraper's token is no API key: it reads nothing else
    assert requests.get(server.url + "/api/v1/projects", headers=scraper,
                        timeout=10).status_code == 401


def test_json_logs_carry_the_request_id_that_the_response_names(
        engine: Engine, database_url: str, redis_url: str, tmp_path: Path) -> None:
    import json

    with live_server(engine, database_url, redis_url, tmp_path,
                     CIRCUS_TRACING__FORMAT="json") as running:
        chosen = requests.get(running.url + "/api/v1/projects", timeout=10,
                              headers={"X-Request-ID": "ci-run-42"})
        assert chosen.headers["X-Request-ID"] == "ci-run-42"
        # a header that would forge log lines is replaced, not echoed
        hostile = requests.get(running.url + "/api/v1/projects", timeout=10,
                               headers={"X-Request-ID": "x" * 80})
        made = hostile.headers["X-Request-ID"]
        assert len(made) == 32
        assert made != "x" * 80
        lines = [json.loads(line) for line in running.daemon.log().splitlines()
                 if line.startswith("{")]
    access = {line["request_id"]: line["message"] for line in lines
              if line.get("logger") == "circus.server.access"}
    assert access["ci-run-42"].startswith("GET /api/v1/projects 401")
    assert access[made].startswith("GET /api/v1/projects 401")

