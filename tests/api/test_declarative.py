"""[declarative]: idempotent upserts through the services, managed flags, removal disables,
the API's refusals with key paths."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session

from circus.auth import passwords
from circus.auth.tokens import digest
from circus.common.config import ConfigError, Settings
from circus.common.enums import ActorKind, JobsetState, Role
from circus.common.models import ApiKey, AuditLog, Base, Jobset, Project, RemoteBuilder, User
from circus.declarative import apply_declarative
from circus.projects.service import NAME_RULE
from tests.api.conftest import Keys, make_app

KEY = "declared-key-0123456789abcdef"


def declaration(tmp_path: Path) -> dict[str, Any]:
    password_file = tmp_path / "pw"
    password_file.write_text("s3cret-password\n")
    return {
        "users": [{"username": "admin", "password_file": str(password_file), "role": "admin"},
                  {"username": "dev", "password": "another-password", "role": "eval-jobset"}],
        "api_keys": [{"name": "ci", "key": KEY, "role": "restart-jobs", "owner": "dev"}],
        "remote_builders": [{"name": "b1", "ssh_uri": "ssh://nix@b1", "max_jobs": 2,
                             "systems": ["x86_64-linux", "i686-linux"]}],
        "projects": [{
            "name": "demo", "description": "Demo", "repository_url": "file:///srv/demo",
            "owner": "admin",
            "jobsets": [{"name": "main", "branch": "main", "check_interval": 30,
                         "inputs": [{"name": "nixpkgs", "type": "string", "value": "x"}]},
                        {"name": "pr", "state": "one_at_a_time",
                         "check_reproducibility": True}],
            "channels": [{"name": "demo-main", "jobset": "main"}],
            "members": [{"username": "dev", "role": "maintainer"}],
            "webhooks": [{"forge_type": "github", "secret": "hook-secret"}],
            "notifications": [{"type": "webhook", "config": {"url": "http://hooks/x"}}],
        }],
    }


def snapshot(db: Session) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table (audit rows included: a no-op apply must write none)."""
    db.expire_all()
    tables = {}
    for table in Base.metadata.sorted_tables:
        rows = db.execute(text(f'SELECT * FROM "{table.name}" ORDER BY 1')).all()
        tables[table.name] = [tuple(row) for row in rows]
    return tables


def test_applying_twice_leaves_the_same_database(
        db: Session, make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    settings = make_settings(declarative=declaration(tmp_path))
    summary = apply_declarative(db, settings)
    db.commit()
    assert "project:demo" in summary["created"]
    assert "user:admin" in summary["created"]
    before = snapshot(db)
    assert len(before["jobsets"]) == 2
    assert len(before["audit_log"]) > 0
    again = apply_declarative(db, settings)
    db.commit()
    assert again == {"created": [], "updated": [], "disabled": [], "removed": []}
    assert snapshot(db) == before
    assert db.scalar(select(Jobset.check_reproducibility).where(Jobset.name == "pr")) is True
    assert db.scalar(select(Jobset.check_reproducibility).where(Jobset.name == "main")) is False

    admin = db.scalar(select(User).where(User.username == "admin"))
    assert admin is not None
    assert admin.managed_declaratively
    assert passwords.verify_password(admin.password_hash, "s3cret-password")
    key = db.scalar(select(ApiKey).where(ApiKey.name == "ci"))
    assert key is not None
    assert key.key_hash == digest(KEY)
    project = db.scalar(select(Project).where(Project.name == "demo"))
    assert project is not None
    assert project.owner_id == admin.id
    assert project.managed_declaratively


def test_changes_and_removals(db: Session, make_settings: Callable[..., Settings],
                              tmp_path: Path) -> None:
    declared = declaration(tmp_path)
    apply_declarative(db, make_settings(declarative=declared))
    db.commit()
    declared["users"] = declared["users"][:1]
    declared["api_keys"] = []
    declared["remote_builders"][0]["max_jobs"] = 8
    project = declared["projects"][0]
    project["members"] = []
    project["jobsets"] = project["jobsets"][:1]
    project["jobsets"][0]["inputs"] = [{"name": "other", "type": "boolean", "value": "true"}]
    project["channels"] = []
    project["webhooks"] = []
    project["notifications"] = [{"type": "webhook", "config": {"url": "http://hooks/y"}}]
    summary = apply_declarative(db, make_settings(declarative=declared))
    db.commit()
    assert sorted(summary["disabled"]) == sorted([
        "user:dev", "api_key:ci", "jobset:demo/pr", "project:demo/webhook:github",
        f"project:demo/notification:{_first_notification(db)}"])
    assert "builder:b1" in summary["updated"]
    dev = db.scalar(select(User).where(User.username == "dev"))
    assert dev is not None
    assert dev.enabled is False
    key = db.scalar(select(ApiKey).where(ApiKey.name == "ci"))
    assert key is not None
    assert key.revoked_at is not None
    pr = db.scalar(select(Jobset).where(Jobset.name == "pr"))
    assert pr is not None
    assert pr.state is JobsetState.disabled
    builder = db.scalar(select(RemoteBuilder))
    assert builder is not None
    assert builder.max_jobs == 8

    # removing the project disables it; nothing is deleted
    summary = apply_declarative(db, make_settings(declarative={"users": declared["users"]}))
    db.commit()
    assert "project:demo" in summary["disabled"]
    assert "builder:b1" in summary["disabled"]
    demo = db.scalar(select(Project).where(Project.name == "demo"))
    assert demo is not None
    assert demo.enabled is False


def _first_notification(db: Session) -> int:
    from circus.common.models import NotificationConfig

    return int(db.scalar(select(NotificationConfig.id).order_by(NotificationConfig.id)) or 0)


def test_unknown_owner_is_a_clear_error(db: Session, make_settings: Callable[..., Settings]
                                        ) -> None:
    settings = make_settings(declarative={"projects": [{"name": "x", "owner": "ghost"}]})
    assert refusal(db, settings) == ["declarative.projects[0].owner: no user 'ghost'"]


def refusal(db: Session, settings: Settings) -> list[str]:
    """The problems of a declaration the services refuse, rolled back as every caller does."""
    with pytest.raises(ConfigError) as raised:
        apply_declarative(db, settings)
    db.rollback()
    return [str(problem) for problem in raised.value.problems]


REDOS = "(a+)+$"


def test_objects_the_api_refuses_are_refused_together_with_their_key_paths(
        db: Session, client: FlaskClient, admin: dict[str, str],
        make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    # the same objects, refused through the API
    def refused(path: str, body: dict[str, Any], field: str) -> list[str]:
        response = client.post(path, headers=admin, json=body)
        assert response.status_code == 400, response.get_json()
        details = response.get_json()["details"]
        return list(details.get("json", details)[field])

    bad_user = refused("/api/v1/users", {"username": "bad user"}, "username")
    bad_name = refused("/api/v1/projects", {"name": "bad name"}, "name")
    assert client.post("/api/v1/projects", headers=admin, json={"name": "api"}).status_code \
        == 201
    assert client.post("/api/v1/projects/api/jobsets", headers=admin,
                       json={"name": "main"}).status_code == 201
    bad_input = refused("/api/v1/projects/api/jobsets/main/inputs",
                        {"name": "flag", "input_type": "boolean", "value": "maybe"}, "value")
    redos = refused("/api/v1/projects/api/notifications",
                    {"type": "webhook", "config": {"url": "http://hooks/x", "jobs": REDOS}},
                    "config")
    assert "exponential" in redos[0]

    declared = declaration(tmp_path)
    declared["users"].append({"username": "bad user"})
    demo = declared["projects"][0]
    demo["jobsets"][0]["inputs"].append({"name": "flag", "type": "boolean", "value": "maybe"})
    demo["notifications"].append({"type": "webhook",
                                  "config": {"url": "http://hooks/x", "jobs": REDOS}})
    declared["projects"].append({"name": "bad name", "jobsets": [{"name": "main"}]})
    assert refusal(db, make_settings(declarative=declared)) == [
        f"declarative.users[2].username: {bad_user[0]}",
        f"declarative.projects[0].jobsets[0].inputs[1].value: {bad_input[0]}",
        f"declarative.projects[0].notifications[1].config: {redos[0]}",
        f"declarative.projects[1].name: {bad_name[0]}",
    ]
    # nothing of the declaration was applied, not even its valid objects
    assert db.scalars(select(Project.name)).all() == ["api"]
    assert db.scalars(select(User.username)).all() == []
    assert db.scalar(select(ApiKey.id).where(ApiKey.name == "ci")) is None


def test_the_audit_log_names_the_system_actor_and_the_services_actions(
        db: Session, make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    apply_declarative(db, make_settings(declarative=declaration(tmp_path)))
    rows = db.execute(select(AuditLog.actor_kind, AuditLog.actor, AuditLog.action)).all()
    assert {(kind, actor) for kind, actor, _ in rows} == {(ActorKind.system, "declarative")}
    assert {action for _, _, action in rows} == {
        "user.create", "api_key.create", "builder.create", "project.create", "jobset.create",
        "input.create", "channel.create", "member.set", "webhook.create",
        "notification.create"}


def test_server_paths_follow_the_apis_rule_which_is_the_actors(
        db: Session, client: FlaskClient, admin: dict[str, str], keys: Keys,
        make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    """An admin (the declarative applier acts as the system) may name server paths in a
    project owned by a non-admin, as an admin may through the API; the owner may not."""
    declared = declaration(tmp_path)
    declared["projects"][0]["owner"] = "dev"
    declared["projects"][0]["jobsets"][0]["inputs"].append(
        {"name": "etc", "type": "path", "value": "/etc"})
    apply_declarative(db, make_settings(declarative=declared))
    db.commit()
    dev = db.scalar(select(User).where(User.username == "dev"))
    assert dev is not None
    by_api = client.post("/api/v1/projects", headers=admin, json={
        "name": "by-api", "repository_url": "file:///srv/demo", "owner_id": dev.id})
    assert by_api.status_code == 201, by_api.get_json()
    owner = keys.headers(Role.eval_jobset, owner=dev)
    for project in ("demo", "by-api"):
        if project == "by-api":
            client.post(f"/api/v1/projects/{project}/jobsets", headers=admin,
                        json={"name": "main"})
        refused = client.post(f"/api/v1/projects/{project}/jobsets/main/inputs",
                              headers=owner,
                              json={"name": "etc2", "input_type": "path", "value": "/etc"})
        assert refused.status_code == 403, refused.get_json()
        assert refused.get_json()["error"] == "server paths need an admin"


def test_the_config_editor_applies_nothing_of_a_refused_declaration(
        db: Session, engine: Engine, make_settings: Callable[..., Settings], keys: Keys,
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config_file = tmp_path / "circus.toml"
    config_file.write_text("")
    monkeypatch.setenv("CIRCUS_CONFIG_FILE", str(config_file))
    client = make_app(make_settings(server={"config_editor_enabled": True}), engine, db
                      ).test_client()
    toml = ('[[declarative.users]]\nusername = "dora"\n'
            '[[declarative.projects]]\nname = "bad name"\n')
    response = client.put("/api/v1/admin/config", headers=keys.headers(), json={"toml": toml})
    assert response.status_code == 400, response.get_json()
    assert response.get_json()["details"]["toml"] == [
        "declarative.projects[0].name: " + NAME_RULE]
    assert config_file.read_text() == ""
    assert db.scalar(select(User.id).where(User.username == "dora")) is None


def test_the_circus_up_demo_applies(db: Session, make_settings: Callable[..., Settings],
                                    tmp_path: Path) -> None:
    from circus.cli.up import demo_declarative

    password = tmp_path / "admin-password"
    password.write_text("demo-password\n")
    settings = make_settings(declarative=demo_declarative(tmp_path / "repo", password))
    summary = apply_declarative(db, settings)
    assert {"user:admin", "project:demo", "jobset:demo/main", "channel:demo-main",
            "project:demo/member:admin"} <= set(summary["created"])
