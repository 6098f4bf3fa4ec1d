"""Projects, jobsets, inputs, webhooks, notifications, channels and members over HTTP."""

from __future__ import annotations

from flask.testing import FlaskClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from circus.auth import sealing
from circus.common.enums import JobsetState
from circus.common.models import AuditLog, Jobset, WebhookConfig
from tests.api.conftest import Keys, World


def create_project(client: FlaskClient, headers: dict[str, str], name: str = "demo") -> dict:
    response = client.post("/api/v1/projects", headers=headers, json={
        "name": name, "description": "d", "repository_url": "https://example.org/r.git"})
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def test_project_crud_and_audit(client: FlaskClient, admin: dict[str, str], db: Session) -> None:
    created = create_project(client, admin)
    assert created["name"] == "demo"
    assert created["enabled"] is True
    assert client.get("/api/v1/projects/demo", headers=admin).get_json()["id"] == created["id"]
    by_id = client.get(f"/api/v1/projects/{created['id']}", headers=admin).get_json()
    assert by_id["name"] == "demo"

    listing = client.get("/api/v1/projects?limit=1", headers=admin).get_json()
    assert listing["total"] == 1
    assert listing["limit"] == 1
    assert listing["offset"] == 0
    assert [p["name"] for p in listing["items"]] == ["demo"]

    updated = client.put("/api/v1/projects/demo", headers=admin,
                         json={"description": "new", "enabled": False}).get_json()
    assert updated["description"] == "new"
    assert updated["enabled"] is False

    assert client.delete("/api/v1/projects/demo", headers=admin).status_code == 204
    assert client.get("/api/v1/projects/demo", headers=admin).status_code == 404
    rows = db.scalars(select(AuditLog).where(AuditLog.action.startswith("project."))
                      .order_by(AuditLog.id)).all()
    assert [r.action for r in rows] == ["project.create", "project.update", "project.delete"]
    row = rows[0]
    assert row is not None
    assert row.actor == "key:admin-key"
    assert row.target == "project:demo"
    assert row.remote_addr == "127.0.0.1"


def test_duplicate_project_is_409(client: FlaskClient, admin: dict[str, str]) -> None:
    create_project(client, admin)
    response = client.post("/api/v1/projects", headers=admin, json={"name": "demo"})
    assert response.status_code == 409
    body = response.get_json()
    assert "already exists" in body["error"]
    assert body["details"] == {"name": "demo"}


def test_validation_errors_name_the_field(client: FlaskClient, admin: dict[str, str]) -> None:
    response = client.post("/api/v1/projects", headers=admin, json={"name": "bad name!"})
    assert response.status_code == 400
    body = response.get_json()
    assert "name" in body["details"]["json"]
    assert body["error"].startswith("invalid input: name")
    response = client.post("/api/v1/projects", headers=admin, json={"description": "x"})
    assert response.status_code == 400
    assert "name" in response.get_json()["details"]["json"]
    response = client.post("/api/v1/projects", headers=admin, json={"name": "x", "bogus": 1})
    assert response.status_code == 400
    assert "bogus" in response.get_json()["details"]["json"]
    response = client.post("/api/v1/projects", headers=admin,
                           json={"name": "x", "repository_url": "gopher://h/r"})
    assert response.status_code == 400
    assert "repository_url" in response.get_json()["details"]
    response = client.get("/api/v1/projects?limit=100000", headers=admin)
    assert response.status_code == 400
    assert "limit" in response.get_json()["details"]["query"]


def test_unknown_ids_are_404_with_json(client: FlaskClient, admin: dict[str, str]) -> None:
    for path in ("/api/v1/projects/nope", "/api/v1/projects/999999",
                 "/api/v1/builds/99999999999999999999999", "/api/v1/evaluations/5",
                 "/api/v1/channels/none", "/api/v1/users/77", "/api/v1/nothing-here"):
        response = client.get(path, headers=admin)
        assert response.status_code == 404, path
        assert set(response.get_json()) == {"error", "details"}


def test_jobsets_and_inputs(client: FlaskClient, admin: dict[str, str], db: Session) -> None:
    create_project(client, admin)
    response = client.post("/api/v1/projects/demo/jobsets", headers=admin, json={
        "name": "main", "branch": "main", "check_interval": 30, "flake_mode": False,
        "nix_expression": "src:release.nix"})
    assert response.status_code == 201, response.get_json()
    jobset = response.get_json()
    assert jobset["enabled"] is True
    assert jobset["state"] == "enabled"
    assert jobset["check_interval"] == 30
    assert jobset["flake_mode"] is False
    assert client.post("/api/v1/projects/demo/jobsets", headers=admin,
                       json={"name": "main"}).status_code == 409
    response = client.put("/api/v1/projects/demo/jobsets/main", headers=admin,
                          json={"enabled": False, "keep_nr": 5})
    assert response.get_json()["state"] == "disabled"
    assert response.get_json()["keep_nr"] == 5
    assert client.put("/api/v1/projects/demo/jobsets/main", headers=admin,
                      json={"scheduling_shares": 0}).status_code == 400

    inputs = "/api/v1/projects/demo/jobsets/main/inputs"
    response = client.post(inputs, headers=admin,
                           json={"name": "src", "input_type": "git", "value": "file:///r"})
    assert response.status_code == 201
    assert client.post(inputs, headers=admin, json={"name": "flag", "input_type": "boolean",
                                                    "value": "maybe"}).status_code == 400
    assert client.post(inputs, headers=admin, json={"name": "src", "input_type": "string"}
                       ).status_code == 409
    assert [i["name"] for i in client.get(inputs, headers=admin).get_json()["items"]] == ["src"]
    assert client.get(inputs + "/src", headers=admin).get_json()["input_type"] == "git"
    assert client.delete(inputs + "/src", headers=admin).status_code == 204
    assert client.get(inputs, headers=admin).get_json()["total"] == 0

    assert client.get("/api/v1/projects/demo/jobsets", headers=admin).get_json()["total"] == 1
    assert client.delete("/api/v1/projects/demo/jobsets/main", headers=admin).status_code == 204
    assert db.scalar(select(Jobset.id).where(Jobset.name == "main")) is None


def test_webhooks_store_the_secret_sealed(client: FlaskClient, admin: dict[str, str],
                                          db: Session, api_settings: object) -> None:
    create_project(client, admin)
    response = client.post("/api/v1/projects/demo/webhooks", headers=admin,
                           json={"forge_type": "github", "secret": "hunter22"})
    assert response.status_code == 201
    hook = response.get_json()
    assert hook["has_secret"] is True
    assert "secret" not in hook
    assert hook["url"].endswith("/api/v1/webhooks/demo/github")
    row = db.get(WebhookConfig, hook["id"])
    assert row is not None
    assert row.secret_encrypted
    assert "hunter22" not in row.secret_encrypted
    key = api_settings.server.secret_key  # type: ignore[attr-defined]
    assert sealing.unseal(key, row.secret_encrypted) == "hunter22"
    assert client.post("/api/v1/projects/demo/webhooks", headers=admin,
                       json={"forge_type": "github"}).status_code == 409
    assert client.get("/api/v1/projects/demo/webhooks", headers=admin).get_json()["total"] == 1
    assert client.delete(f"/api/v1/projects/demo/webhooks/{hook['id']}",
                         headers=admin).status_code == 204


def test_notifications_channels_members(client: FlaskClient, admin: dict[str, str], keys: Keys,
                                        world: World) -> None:
    create_project(client, admin)
    jobset = client.post("/api/v1/projects/demo/jobsets", headers=admin,
                         json={"name": "main"}).get_json()
    response = client.post("/api/v1/projects/demo/notifications", headers=admin,
                           json={"type": "webhook", "config": {"url": "http://h/x"}})
    assert response.status_code == 201
    assert response.get_json()["config"] == {"url": "http://h/x"}
    assert client.post("/api/v1/projects/demo/notifications", headers=admin,
                       json={"type": "carrier-pigeon"}).status_code == 400
    assert client.get("/api/v1/projects/demo/notifications",
                      headers=admin).get_json()["total"] == 1

    response = client.post("/api/v1/channels", headers=admin,
                           json={"name": "demo-main", "jobset_id": jobset["id"]})
    assert response.status_code == 201
    assert client.get("/api/v1/projects/demo/channels", headers=admin).get_json()["total"] == 1
    assert client.post("/api/v1/channels", headers=admin, json={
        "name": "demo-main", "jobset_id": jobset["id"]}).status_code == 409
    other = world.evaluation(world.jobset(world.project("other")))
    assert client.post(f"/api/v1/channels/demo-main/promote/{other.id}",
                       headers=admin).status_code == 400
    mine = world.evaluation(world.db.get(Jobset, jobset["id"]))  # type: ignore[arg-type]
    promoted = client.post(f"/api/v1/channels/demo-main/promote/{mine.id}", headers=admin)
    assert promoted.status_code == 200
    assert promoted.get_json()["evaluation_id"] == mine.id
    assert client.delete("/api/v1/channels/demo-main", headers=admin).status_code == 204

    alice = keys.user("alice")
    response = client.post("/api/v1/projects/demo/members", headers=admin,
                           json={"username": "alice", "role": "maintainer"})
    assert response.status_code == 201
    assert response.get_json()["user_id"] == alice.id
    assert client.post("/api/v1/projects/demo/members", headers=admin,
                       json={"username": "alice", "user_id": alice.id}).status_code == 400
    members = client.get("/api/v1/projects/demo/members", headers=admin).get_json()
    assert [(m["username"], m["role"]) for m in members["items"]] == [("alice", "maintainer")]
    assert client.delete(f"/api/v1/projects/demo/members/{alice.id}",
                         headers=admin).status_code == 204
    assert client.delete(f"/api/v1/projects/demo/members/{alice.id}",
                         headers=admin).status_code == 404


def test_managed_projects_cannot_be_deleted(client: FlaskClient, admin: dict[str, str],
                                            world: World) -> None:
    world.project("managed", managed_declaratively=True)
    response = client.delete("/api/v1/projects/managed", headers=admin)
    assert response.status_code == 409
    assert "declarative" in response.get_json()["error"]


def test_project_builds_list(client: FlaskClient, admin: dict[str, str], world: World) -> None:
    project = world.project()
    evaluation = world.evaluation(world.jobset(project))
    world.build(evaluation, "a")
    world.evaluation(world.jobset(world.project("other")))
    body = client.get("/api/v1/projects/proj/builds", headers=admin).get_json()
    assert [b["job_name"] for b in body["items"]] == ["a"]
    assert JobsetState.enabled.value == "enabled"


def test_jobset_check_reproducibility(client: FlaskClient, admin: dict[str, str]) -> None:
    create_project(client, admin)
    url = "/api/v1/projects/demo/jobsets"
    response = client.post(url, headers=admin, json={"name": "main"})
    assert response.status_code == 201, response.get_json()
    assert response.get_json()["check_reproducibility"] is False
    response = client.put(url + "/main", headers=admin, json={"check_reproducibility": True})
    assert response.status_code == 200, response.get_json()
    assert client.get(url + "/main", headers=admin).get_json()["check_reproducibility"] is True
    response = client.put(url + "/main", headers=admin, json={"check_reproducibility": "maybe"})
    assert response.status_code == 400
    assert "check_reproducibility" in str(response.get_json())
