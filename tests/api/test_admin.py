"""Users, builders, agent sessions, notification tasks, audit, system, config, search, news,
metrics."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from flask.testing import FlaskClient
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from circus.common.config import Settings
from circus.common.enums import BuildStatus, NotificationTaskStatus, NotificationType, Role
from circus.common.models import BuilderSession, NotificationTask
from circus.common.models.base import utcnow
from tests.api.conftest import Keys, World, make_app


def test_users_crud(client: FlaskClient, admin: dict[str, str], keys: Keys) -> None:
    response = client.post("/api/v1/users", headers=admin, json={
        "username": "bob", "password": "long enough", "role": "restart-jobs",
        "email": "bob@example.org"})
    assert response.status_code == 201
    bob = response.get_json()
    assert bob["has_password"] is True
    assert "password" not in bob
    assert client.post("/api/v1/users", headers=admin, json={"username": "bob"}
                       ).status_code == 409
    assert client.post("/api/v1/users", headers=admin, json={
        "username": "carol", "password": "short"}).status_code == 400
    listing = client.get("/api/v1/users?role=restart-jobs", headers=admin).get_json()
    assert [u["username"] for u in listing["items"]] == ["bob"]
    updated = client.put(f"/api/v1/users/{bob['id']}", headers=admin,
                         json={"role": "admin", "enabled": False}).get_json()
    assert updated["role"] == "admin"
    assert updated["enabled"] is False
    # users may read themselves, not others
    alice = keys.user("alice")
    mine = keys.headers(Role.read_only, owner=alice)
    assert client.get(f"/api/v1/users/{alice.id}", headers=mine).status_code == 200
    assert client.get(f"/api/v1/users/{bob['id']}", headers=mine).status_code == 403
    assert client.delete(f"/api/v1/users/{bob['id']}", headers=admin).status_code == 204
    assert client.get(f"/api/v1/users/{bob['id']}", headers=admin).status_code == 404


def test_starred_jobs(client: FlaskClient, keys: Keys, world: World) -> None:
    jobset = world.jobset(world.project())
    headers = keys.headers(Role.read_only, owner=keys.user("alice"))
    response = client.post("/api/v1/me/starred-jobs", headers=headers,
                           json={"jobset_id": jobset.id, "job_name": "hello"})
    assert response.status_code == 201
    star = response.get_json()
    assert client.post("/api/v1/me/starred-jobs", headers=headers,
                       json={"jobset_id": jobset.id, "job_name": "hello"}).status_code == 409
    assert client.post("/api/v1/me/starred-jobs", headers=headers,
                       json={"jobset_id": 999999, "job_name": "x"}).status_code == 404
    assert client.get("/api/v1/me/starred-jobs", headers=headers).get_json()["total"] == 1
    assert client.delete(f"/api/v1/me/starred-jobs/{star['id']}",
                         headers=headers).status_code == 204
    ownerless = keys.headers(Role.admin, name="robot")
    assert client.get("/api/v1/me/starred-jobs", headers=ownerless).status_code == 404


def test_builders_and_sessions(client: FlaskClient, admin: dict[str, str], db: Session) -> None:
    response = client.post("/api/v1/admin/builders", headers=admin, json={
        "name": "big", "ssh_uri": "ssh://builder@big", "systems": ["x86_64-linux"],
        "max_jobs": 4, "supported_features": ["kvm"]})
    assert response.status_code == 201
    builder = response.get_json()
    assert builder["supported_features"] == ["kvm"]
    assert client.post("/api/v1/admin/builders", headers=admin, json={
        "name": "bad", "ssh_uri": "http://x"}).status_code == 400
    assert client.put(f"/api/v1/admin/builders/{builder['id']}", headers=admin,
                      json={"enabled": False}).get_json()["enabled"] is False
    assert client.get("/api/v1/admin/builders", headers=admin).get_json()["total"] == 1
    assert client.delete(f"/api/v1/admin/builders/{builder['id']}",
                         headers=admin).status_code == 204

    db.add_all([BuilderSession(machine_id="m1", name="agent-1", hostname="h1",
                               systems=["x86_64-linux"], proto_version=1, connected=True,
                               last_seen=utcnow()),
                BuilderSession(machine_id="m2", name="agent-2", hostname="h2",
                               systems=["aarch64-linux"], proto_version=1, connected=False)])
    db.commit()
    sessions = client.get("/api/v1/admin/builders/sessions", headers=admin).get_json()
    assert sessions["total"] == 2
    connected = client.get("/api/v1/admin/builders/sessions/connected", headers=admin).get_json()
    assert [s["name"] for s in connected["items"]] == ["agent-1"]
    assert client.get("/api/v1/admin/builders/sessions?connected=false",
                      headers=admin).get_json()["items"][0]["name"] == "agent-2"
    assert client.get("/api/v1/admin/builders/sessions/m2", headers=admin).get_json()[
        "hostname"] == "h2"
    assert client.get("/api/v1/admin/builders/sessions/nope", headers=admin).status_code == 404


def test_notification_tasks_and_audit(client: FlaskClient, admin: dict[str, str],
                                      db: Session) -> None:
    failed = NotificationTask(type=NotificationType.slack, payload={}, attempts=5,
                              status=NotificationTaskStatus.failed, last_error="timeout")
    done = NotificationTask(type=NotificationType.email, payload={},
                            status=NotificationTaskStatus.completed)
    db.add_all([failed, done])
    db.commit()
    listing = client.get("/api/v1/admin/notification-tasks?status=failed", headers=admin)
    assert [t["id"] for t in listing.get_json()["items"]] == [failed.id]
    retried = client.post(f"/api/v1/admin/notification-tasks/{failed.id}/retry", headers=admin)
    assert retried.get_json()["status"] == "pending"
    assert retried.get_json()["attempts"] == 0
    assert client.post(f"/api/v1/admin/notification-tasks/{done.id}/retry",
                       headers=admin).status_code == 409
    audit = client.get("/api/v1/admin/audit-log?action=notification_task.retry",
                       headers=admin).get_json()
    assert audit["total"] == 1
    assert audit["items"][0]["actor"] == "key:admin-key"
    assert audit["items"][0]["actor_kind"] == "api_key"


def test_system_and_config(make_settings: Callable[..., Settings], engine: Engine, db: Session,
                           keys: Keys, tmp_path: Path, monkeypatch: object) -> None:
    config_file = tmp_path / "circus.toml"
    config_file.write_text("")
    monkeypatch.setenv("CIRCUS_CONFIG_FILE", str(config_file))  # type: ignore[attr-defined]
    settings = make_settings(server={"config_editor_enabled": True})
    client = make_app(settings, engine, db).test_client()
    admin = keys.headers()
    system = client.get("/api/v1/admin/system", headers=admin).get_json()
    assert system["database"]["ok"] is True
    assert "builds" in system["counts"]
    config = client.get("/api/v1/admin/config", headers=admin).get_json()
    assert config["config"]["server"]["secret_key"] == "<redacted>"
    assert config["config"]["database"]["url"] == "<redacted>"
    assert config["editable"] is True

    bad = client.put("/api/v1/admin/config", headers=admin, json={"toml": "[server]\nport = -1"})
    assert bad.status_code == 400
    assert "server.port" in bad.get_json()["details"]["toml"][0]
    assert client.put("/api/v1/admin/config", headers=admin,
                      json={"toml": "not = [toml"}).status_code == 400
    new = ('[[declarative.users]]\nusername = "dora"\nrole = "eval-jobset"\n'
           '[server]\nconfig_editor_enabled = true\n')
    response = client.put("/api/v1/admin/config", headers=admin, json={"toml": new})
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["declarative"]["created"] == ["user:dora"]
    assert config_file.read_text() == new
    users = client.get("/api/v1/users?q=dora", headers=admin).get_json()
    assert users["items"][0]["managed_declaratively"] is True


def test_search_news_metrics(client: FlaskClient, admin: dict[str, str], world: World) -> None:
    project = world.project("searchable", description="a thing")
    evaluation = world.evaluation(world.jobset(project))
    build = world.build(evaluation, "hello-world", BuildStatus.succeeded,
                        outputs={"out": "/nix/store/abcdefgh-hello"},
                        started_at=utcnow(), completed_at=utcnow())
    found = client.get("/api/v1/search?q=hello", headers=admin).get_json()
    assert [j["name"] for j in found["jobs"]] == ["hello-world"]
    assert client.get("/api/v1/search?q=searchable", headers=admin).get_json()[
        "projects"][0]["id"] == project.id
    assert client.get(f"/api/v1/search?q={build.id}", headers=admin).get_json()[
        "builds"][0]["id"] == build.id
    assert client.get("/api/v1/search?q=abcdefgh", headers=admin).get_json()[
        "store_paths"][0]["build_id"] == build.id
    assert client.get("/api/v1/search", headers=admin).status_code == 400

    news = client.post("/api/v1/news", headers=admin, json={"title": "t", "contents": "hi"})
    assert news.status_code == 201
    assert client.get("/api/v1/news", headers=admin).get_json()["total"] == 1
    assert client.delete(f"/api/v1/news/{news.get_json()['id']}", headers=admin).status_code == 204

    systems = client.get("/api/v1/metrics/systems", headers=admin).get_json()
    assert systems["systems"][0]["system"] == "x86_64-linux"
    assert systems["systems"][0]["succeeded"] == 1
    series = client.get("/api/v1/metrics/timeseries/builds?days=1", headers=admin).get_json()
    assert series["series"][0]["values"] == {"succeeded": 1.0}
    duration = client.get("/api/v1/metrics/timeseries/duration?bucket=hour",
                          headers=admin).get_json()
    assert duration["bucket"] == "hour"
    assert len(duration["series"]) == 1

    assert client.get("/metrics").status_code == 401
    metrics = client.get("/metrics", headers=admin)
    assert metrics.status_code == 200
    text = metrics.get_data(as_text=True)
    assert 'circus_builds{status="succeeded"} 1.0' in text
    assert "circus_http_request_duration_seconds" in text or "flask_http_request" in text
