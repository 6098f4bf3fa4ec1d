"""Forms: the change happens through the service, bad input comes back inline."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from circus.common.enums import NotificationTaskStatus, Role
from circus.common.models import (
    ApiKey,
    AuditLog,
    Jobset,
    News,
    NotificationTask,
    Project,
    RemoteBuilder,
    User,
)
from tests.dashboard.conftest import PASSWORD, Browser
from tests.dashboard.factories import Rows, World


def errors_under(page: str, field: str) -> list[str]:
    """The inline error texts rendered under one field."""
    match = re.search(rf'<div class="field has-error">\s*<label for="f-{field}">.*?</div>',
                      page, re.S)
    assert match, f"no error under {field}"
    return re.findall(r'<small class="error"[^>]*>([^<]*)</small>', match.group(0))


def test_create_project_and_jobset(as_admin: Browser, rows: Rows) -> None:
    response = as_admin.post("/projects", {"name": "fresh", "description": "new one",
                                           "repository_url": "https://example.org/x.git"},
                             page="/projects")
    assert response.status_code == 302
    assert response.location == "/project/fresh"
    project = rows.db.query(Project).filter_by(name="fresh").one()
    assert project.description == "new one"
    response = as_admin.post("/project/fresh/jobsets", {
        "name": "release", "nix_expression": "checks", "branch": "release-1",
        "flake_mode": "true", "state": "enabled", "trigger_mode": "interval",
        "check_interval": "300", "scheduling_shares": "50", "keep_nr": "2"},
        page="/project/fresh")
    assert response.status_code == 302
    assert response.location == "/jobset/fresh/release"
    jobset = rows.db.query(Jobset).filter_by(project_id=project.id, name="release").one()
    assert (jobset.check_interval, jobset.scheduling_shares, jobset.keep_nr,
            jobset.trigger_mode.value) == (300, 50, 2, "interval")
    assert rows.db.query(AuditLog).filter_by(action="jobset.create").count() == 1


def test_edit_project_and_jobset_settings(as_admin: Browser, as_viewer: Browser,
                                          world: World, rows: Rows) -> None:
    page = as_admin.get("/jobset/demo/main").get_data(as_text=True)
    # the settings form starts from the jobset's current values
    assert "Jobset settings" in page
    assert re.search(r'<option value="source_change" selected>', page)
    saved = as_admin.post("/jobset/demo/main/settings", {
        "description": "nightly", "nix_expression": "checks", "branch": "next",
        "flake_mode": "true", "state": "one_at_a_time", "trigger_mode": "interval",
        "check_interval": "900", "scheduling_shares": "7", "keep_nr": "4",
        "check_reproducibility": "true"},
        page="/jobset/demo/main")
    assert saved.status_code == 302
    assert saved.location == "/jobset/demo/main"
    jobset = rows.db.query(Jobset).filter_by(name="main").one()
    rows.db.refresh(jobset)
    assert (jobset.description, jobset.nix_expression, jobset.branch, jobset.state.value,
            jobset.trigger_mode.value, jobset.check_interval, jobset.scheduling_shares,
            jobset.keep_nr) == ("nightly", "checks", "next", "one_at_a_time", "interval", 900,
                                7, 4)
    assert jobset.check_reproducibility is True
    assert rows.db.query(AuditLog).filter_by(action="jobset.update").count() == 1
    bad = as_admin.post("/jobset/demo/main/settings", {"check_interval": "-1",
                                                       "state": "enabled"},
                        page="/jobset/demo/main")
    assert bad.status_code == 400
    assert errors_under(bad.get_data(as_text=True), "check_interval") == ["must be at least 0"]

    project = as_admin.post("/project/demo/settings", {
        "description": "the demo", "repository_url": "https://example.org/demo.git",
        "enabled": "true", "hidden": "true", "cache_enabled": "false"}, page="/project/demo")
    assert project.status_code == 302
    row = rows.db.query(Project).filter_by(name="demo").one()
    rows.db.refresh(row)
    assert (row.description, row.repository_url, row.hidden, row.cache_enabled) == (
        "the demo", "https://example.org/demo.git", True, False)
    scheme = as_admin.post("/project/demo/settings", {"repository_url": "ftp://x"},
                           page="/project/demo")
    assert scheme.status_code == 400
    assert errors_under(scheme.get_data(as_text=True), "repository_url")

    # a read-only user sees no settings and cannot post them
    row.hidden = False
    rows.db.commit()
    assert "Project settings" not in as_viewer.get("/project/demo").get_data(as_text=True)
    assert as_viewer.post("/project/demo/settings", {"description": "x"},
                          page="/project/demo").status_code == 403
    assert as_viewer.post("/jobset/demo/main/settings", {"state": "enabled"},
                          page="/jobset/demo/main").status_code == 403


def test_bad_project_and_jobset_input_is_shown_inline(as_admin: Browser, world: World,
                                                    rows: Rows) -> None:
    response = as_admin.post("/projects", {"name": "bad name!", "description": "kept",
                                           "repository_url": "ftp://x"}, page="/projects")
    assert response.status_code == 400
    page = response.get_data(as_text=True)
    assert errors_under(page, "name") == [
        "letters, digits, &#39;.&#39;, &#39;_&#39; and &#39;-&#39;, starting with a letter "
        "or digit, at most 128"]
    assert 'value="kept"' in page
    assert "<details class=\"panel\" open>" in page
    duplicate = as_admin.post("/projects", {"name": "demo"}, page="/projects")
    assert duplicate.status_code == 409
    assert "project &#39;demo&#39; already exists" in duplicate.get_data(as_text=True)
    scheme = as_admin.post("/projects", {"name": "ok", "repository_url": "ftp://x"},
                           page="/projects")
    assert scheme.status_code == 400
    assert errors_under(scheme.get_data(as_text=True), "repository_url")
    jobset = as_admin.post("/project/demo/jobsets", {"name": "x", "check_interval": "soon",
                                                     "scheduling_shares": "0",
                                                     "state": "sometimes"},
                           page="/project/demo")
    assert jobset.status_code == 400
    page = jobset.get_data(as_text=True)
    assert errors_under(page, "check_interval") == ["must be a whole number"]
    assert errors_under(page, "scheduling_shares") == ["must be at least 1"]
    assert errors_under(page, "state") == ["unknown state"]
    assert rows.db.query(Project).count() == 1


def test_read_only_users_cannot_create_projects(as_viewer: Browser, world: World) -> None:
    assert "Create a project" not in as_viewer.get("/projects").get_data(as_text=True)
    response = as_viewer.post("/projects", {"name": "sneaky"}, page="/settings")
    assert response.status_code == 403
    assert "may not project.create" in response.get_data(as_text=True)


def test_api_key_forms(as_viewer: Browser, rows: Rows, users: dict[str, User]) -> None:
    missing = as_viewer.post("/settings/api-keys", {"name": "", "role": "read-only"},
                             page="/settings")
    assert missing.status_code == 400
    assert errors_under(missing.get_data(as_text=True), "name") == ["required"]
    elevated = as_viewer.post("/settings/api-keys", {"name": "root", "role": "admin"},
                              page="/settings")
    assert elevated.status_code == 403
    assert "you cannot create a key with role admin" in elevated.get_data(as_text=True)
    created = as_viewer.post("/settings/api-keys", {"name": "ci", "role": "read-only"},
                             page="/settings")
    assert created.status_code == 200
    assert created.headers["Cache-Control"] == "no-store"
    secret = re.search(r'id="new-api-key">([^<]+)<', created.get_data(as_text=True))
    assert secret
    key = rows.db.query(ApiKey).filter_by(name="ci").one()
    assert key.owner_id == users["viewer"].id
    assert secret.group(1).startswith(key.key_prefix)
    revoked = as_viewer.post(f"/settings/api-keys/{key.id}/revoke", page="/settings")
    assert revoked.status_code == 302
    rows.db.refresh(key)
    assert key.revoked_at is not None
    # someone else's key is not found
    other = rows.db.query(ApiKey).count()
    admin_key = ApiKey(name="theirs", key_hash="h" * 64, key_prefix="x",
                       role=Role.admin, owner_id=users["admin"].id)
    rows.db.add(admin_key)
    rows.db.commit()
    assert other == 1
    assert as_viewer.post(f"/settings/api-keys/{admin_key.id}/revoke",
                          page="/settings").status_code == 404


def test_profile_and_password(as_viewer: Browser, rows: Rows, users: dict[str, User]) -> None:
    bad = as_viewer.post("/settings/profile", {"email": "nope", "full_name": "Vic"},
                         page="/settings")
    assert bad.status_code == 400
    assert errors_under(bad.get_data(as_text=True), "email") == ["not an email address"]
    good = as_viewer.post("/settings/profile", {"email": "vic@example.org",
                                                "full_name": "Vic Viewer"}, page="/settings")
    assert good.status_code == 302
    rows.db.refresh(users["viewer"])
    assert users["viewer"].full_name == "Vic Viewer"

    mismatch = as_viewer.post("/settings/password", {
        "current_password": PASSWORD, "new_password": "abcdefghij",
        "new_password2": "abcdefghik"}, page="/settings")
    assert mismatch.status_code == 400
    page = mismatch.get_data(as_text=True)
    assert errors_under(page, "new_password2") == ["does not match the new password"]
    assert "abcdefghij" not in page
    short = as_viewer.post("/settings/password", {
        "current_password": PASSWORD, "new_password": "short", "new_password2": "short"},
        page="/settings")
    assert short.status_code == 400
    assert errors_under(short.get_data(as_text=True), "new_password") == [
        "must be at least 8 characters"]
    wrong = as_viewer.post("/settings/password", {
        "current_password": "not-it-at-all", "new_password": "abcdefghij",
        "new_password2": "abcdefghij"}, page="/settings")
    assert wrong.status_code == 403
    assert errors_under(wrong.get_data(as_text=True), "current_password") == ["wrong"]
    changed = as_viewer.post("/settings/password", {
        "current_password": PASSWORD, "new_password": "abcdefghij",
        "new_password2": "abcdefghij"}, page="/settings")
    assert changed.status_code == 302
    assert changed.location.startswith("/login")
    # every session ended, this one too; the new password works
    assert as_viewer.get("/settings").status_code == 302
    as_viewer.login("vic", "abcdefghij")
    assert as_viewer.get("/settings").status_code == 200


def test_admin_manages_users_and_builders(as_admin: Browser, rows: Rows,
                                          users: dict[str, User]) -> None:
    short = as_admin.post("/admin/users", {"username": "new", "password": "x",
                                           "role": "read-only"}, page="/admin/users")
    assert short.status_code == 400
    assert errors_under(short.get_data(as_text=True), "password") == [
        "must be at least 8 characters"]
    duplicate = as_admin.post("/admin/users", {"username": "vic", "role": "read-only"},
                              page="/admin/users")
    assert duplicate.status_code == 409
    created = as_admin.post("/admin/users", {"username": "newbie", "password": PASSWORD,
                                             "role": "eval-jobset"}, page="/admin/users")
    assert created.status_code == 302
    newbie = rows.db.query(User).filter_by(username="newbie").one()
    assert newbie.role is Role.eval_jobset
    as_admin.post(f"/admin/users/{newbie.id}", {"role": "restart-jobs"}, page="/admin/users")
    as_admin.post(f"/admin/users/{newbie.id}", {"enabled": "false"}, page="/admin/users")
    rows.db.refresh(newbie)
    assert (newbie.role, newbie.enabled) == (Role.restart_jobs, False)

    bad = as_admin.post("/admin/builders", {"name": "b 1", "ssh_uri": "ftp://x",
                                            "systems": "", "max_jobs": "0"},
                        page="/admin/builders")
    assert bad.status_code == 400
    page = bad.get_data(as_text=True)
    assert errors_under(page, "name")
    assert errors_under(page, "systems") == ["required"]
    assert errors_under(page, "max_jobs") == ["must be at least 1"]
    uri = as_admin.post("/admin/builders", {"name": "b1", "ssh_uri": "ftp://x",
                                            "systems": "x86_64-linux"}, page="/admin/builders")
    assert uri.status_code == 400
    assert errors_under(uri.get_data(as_text=True), "ssh_uri")
    added = as_admin.post("/admin/builders", {
        "name": "b1", "ssh_uri": "ssh://nix@build1", "systems": "x86_64-linux, i686-linux",
        "supported_features": "kvm big-parallel", "max_jobs": "4", "speed_factor": "2.5"},
        page="/admin/builders")
    assert added.status_code == 302
    builder = rows.db.query(RemoteBuilder).filter_by(name="b1").one()
    assert builder.systems == ["x86_64-linux", "i686-linux"]
    assert builder.supported_features == ["kvm", "big-parallel"]
    assert (builder.max_jobs, builder.speed_factor) == (4, 2.5)
    as_admin.post(f"/admin/builders/{builder.id}/disable", page="/admin/builders")
    rows.db.refresh(builder)
    assert builder.enabled is False
    assert "b1" in as_admin.get("/machines").get_data(as_text=True)
    as_admin.post(f"/admin/builders/{builder.id}/delete", page="/admin/builders")
    assert rows.db.query(RemoteBuilder).count() == 0


def test_admin_retries_a_failed_notification(as_admin: Browser, world: World,
                                             rows: Rows) -> None:
    task = rows.db.query(NotificationTask).one()
    page = as_admin.get("/admin/notifications?status=failed").get_data(as_text=True)
    assert "connection refused" in page
    response = as_admin.post(f"/admin/notifications/{task.id}/retry",
                             page="/admin/notifications")
    assert response.status_code == 302
    rows.db.refresh(task)
    assert (task.status, task.attempts, task.last_error) == (
        NotificationTaskStatus.pending, 0, None)
    audit = as_admin.get("/admin/audit?action=notification_task.retry").get_data(as_text=True)
    assert f"notification_task:{task.id}" in audit


def test_news(as_admin: Browser, as_viewer: Browser, rows: Rows) -> None:
    empty = as_admin.post("/news", {"title": "t", "contents": ""}, page="/news")
    assert empty.status_code == 400
    assert errors_under(empty.get_data(as_text=True), "contents") == ["required"]
    assert as_admin.post("/news", {"title": "Upgrade", "contents": "Nix 2.8 → 2.9 tonight"},
                         page="/news").status_code == 302
    assert "Nix 2.8 → 2.9 tonight" in as_viewer.get("/").get_data(as_text=True)
    assert "Post news" not in as_viewer.get("/news").get_data(as_text=True)
    item = rows.db.query(News).one()
    assert as_viewer.post(f"/news/{item.id}/delete", page="/settings").status_code == 403
    assert as_admin.post(f"/news/{item.id}/delete", page="/news").status_code == 302
    assert rows.db.query(News).count() == 0


class TestConfigEditor:
    @pytest.fixture
    def config_file(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
        path = tmp_path / "circus.toml"
        path.write_text('[server]\nconfig_editor_enabled = true\n')
        monkeypatch.setenv("CIRCUS_CONFIG_FILE", str(path))
        return path

    @pytest.fixture
    def dash_overrides(self) -> dict[str, Any]:
        return {"server": {"config_editor_enabled": True}}

    def test_invalid_config_is_refused_inline_and_valid_config_written(
            self, as_admin: Browser, config_file: Path, rows: Rows) -> None:
        page = as_admin.get("/admin/config").get_data(as_text=True)
        assert "config_editor_enabled = true" in page
        assert "<redacted>" not in page or "&lt;redacted&gt;" in page
        broken = as_admin.post("/admin/config", {"toml": "[server\n"}, page="/admin/config")
        assert broken.status_code == 400
        assert errors_under(broken.get_data(as_text=True), "toml")
        invalid = as_admin.post("/admin/config", {"toml": "[server]\nport = -1\n"},
                                page="/admin/config")
        assert invalid.status_code == 400
        assert "server.port" in " ".join(errors_under(invalid.get_data(as_text=True), "toml"))
        assert config_file.read_text() == '[server]\nconfig_editor_enabled = true\n'
        text = ('[server]\nconfig_editor_enabled = true\n\n[[declarative.users]]\n'
                'username = "declared"\n')
        saved = as_admin.post("/admin/config", {"toml": text}, page="/admin/config")
        assert saved.status_code == 302
        assert config_file.read_text() == text
        assert rows.db.query(User).filter_by(username="declared").count() == 1


def test_config_page_is_read_only_by_default(as_admin: Browser) -> None:
    page = as_admin.get("/admin/config").get_data(as_text=True)
    assert "Validate and save" not in page
    assert "&lt;redacted&gt;" in page
    response = as_admin.post("/admin/config", {"toml": "x = 1"}, page="/admin/config")
    assert response.status_code == 409


def test_add_and_remove_jobset_inputs(as_admin: Browser, as_viewer: Browser, world: World,
                                      rows: Rows) -> None:
    from circus.common.models import JobsetInput

    page = as_admin.get("/jobset/demo/main").get_data(as_text=True)
    assert "Add an input" in page
    added = as_admin.post("/jobset/demo/main/inputs", {
        "name": "nixpkgs", "input_type": "git",
        "value": "https://example.org/nixpkgs.git release"}, page="/jobset/demo/main")
    assert added.status_code == 302
    row = rows.db.query(JobsetInput).filter_by(name="nixpkgs").one()
    assert (row.input_type.value, row.value) == ("git", "https://example.org/nixpkgs.git release")
    assert "https://example.org/nixpkgs.git release" in as_admin.get(
        "/jobset/demo/main").get_data(as_text=True)
    # bad input comes back inline, the values kept
    bad = as_admin.post("/jobset/demo/main/inputs", {"name": "flag", "input_type": "boolean",
                                                      "value": "maybe"}, page="/jobset/demo/main")
    assert bad.status_code == 400
    assert errors_under(bad.get_data(as_text=True), "value") == ["must be true or false"]
    duplicate = as_admin.post("/jobset/demo/main/inputs", {"name": "nixpkgs",
                                                            "input_type": "string"},
                              page="/jobset/demo/main")
    assert duplicate.status_code == 409
    # read-only users see the inputs but cannot change them
    viewer_page = as_viewer.get("/jobset/demo/main").get_data(as_text=True)
    assert "nixpkgs" in viewer_page
    assert "Add an input" not in viewer_page
    assert as_viewer.post("/jobset/demo/main/inputs/nixpkgs/delete",
                          page="/jobset/demo/main").status_code == 403
    removed = as_admin.post("/jobset/demo/main/inputs/nixpkgs/delete", page="/jobset/demo/main")
    assert removed.status_code == 302
    assert rows.db.query(JobsetInput).filter_by(name="nixpkgs").count() == 0
    assert rows.db.query(AuditLog).filter_by(action="input.delete").count() == 1


def test_project_members_from_the_project_page(as_admin: Browser, as_viewer: Browser,
                                               world: World, rows: Rows) -> None:
    from circus.common.models import ProjectMember

    viewer = rows.db.query(User).filter_by(username="vic").one()
    project = rows.db.query(Project).filter_by(name="demo").one()
    added = as_admin.post("/project/demo/members", {"username": "vic",
                                                    "role": "maintainer"},
                          page="/project/demo")
    assert added.status_code == 302
    member = rows.db.get(ProjectMember, (project.id, viewer.id))
    assert member is not None
    assert member.role.value == "maintainer"
    # as a maintainer the viewer now sees the project's settings, not the member form
    page = as_viewer.get("/project/demo").get_data(as_text=True)
    assert "Project settings" in page
    assert "Add a member" not in page
    unknown = as_admin.post("/project/demo/members", {"username": "nobody", "role": "member"},
                            page="/project/demo")
    assert unknown.status_code == 400
    assert errors_under(unknown.get_data(as_text=True), "username") == ["no such user"]
    assert as_viewer.post(f"/project/demo/members/{viewer.id}/delete",
                          page="/project/demo").status_code == 403
    removed = as_admin.post(f"/project/demo/members/{viewer.id}/delete", page="/project/demo")
    assert removed.status_code == 302
    rows.db.expire_all()
    assert rows.db.get(ProjectMember, (project.id, viewer.id)) is None
