"""[declarative]: idempotent upserts, managed flags, removal disables."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from circus.auth import passwords
from circus.auth.tokens import digest
from circus.common.config import Settings
from circus.common.enums import JobsetState
from circus.common.models import ApiKey, Base, Jobset, Project, RemoteBuilder, User
from circus.declarative import apply_declarative

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
    import pytest

    from circus.common.errors import InvalidInput

    settings = make_settings(declarative={"projects": [{"name": "x", "owner": "ghost"}]})
    with pytest.raises(InvalidInput, match="ghost"):
        apply_declarative(db, settings)


def test_the_circus_up_demo_applies(db: Session, make_settings: Callable[..., Settings],
                                    tmp_path: Path) -> None:
    from circus.cli.up import demo_declarative

    password = tmp_path / "admin-password"
    password.write_text("demo-password\n")
    settings = make_settings(declarative=demo_declarative(tmp_path / "repo", password))
    summary = apply_declarative(db, settings)
    assert {"user:admin", "project:demo", "jobset:demo/main", "channel:demo-main",
            "project:demo/member:admin"} <= set(summary["created"])
