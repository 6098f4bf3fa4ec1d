"""Inbound forge webhooks: signatures, pushes, pull/merge requests, pings, bad input."""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from typing import Any
from urllib.parse import urlencode

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from circus.auth import sealing
from circus.common.enums import ForgeType, JobsetState, TriggerKind
from circus.common.models import AuditLog, Evaluation, Jobset, Project, WebhookConfig
from circus.server.context import server_context
from tests.notifications.conftest import Rows

SECRET = "It's a Secret to Everybody"
HEAD = "f" * 40
PR_HEAD = "e" * 40


@pytest.fixture
def world(rows: Rows, db: Session, api_app: Flask) -> dict[str, Any]:
    """A project with jobsets on main, main (disabled), release and the default branch."""
    project = rows.project()
    main = rows.jobset(project, "main", branch="main")
    rows.jobset(project, "main-off", branch="main", state=JobsetState.disabled)
    release = rows.jobset(project, "release", branch="release")
    default = rows.jobset(project, "default", branch=None)
    key = server_context(api_app).settings.server.secret_key or ""
    for forge in ForgeType:
        db.add(WebhookConfig(project_id=project.id, forge_type=forge,
                             secret_encrypted=sealing.seal(key, SECRET)))
    db.commit()
    return {"project": project, "main": main, "release": release, "default": default}


def evaluations(db: Session) -> list[Evaluation]:
    return list(db.scalars(select(Evaluation).order_by(Evaluation.id)))


def audits(db: Session) -> list[AuditLog]:
    return list(db.scalars(select(AuditLog).where(AuditLog.action == "webhook.receive")))


def sign(body: bytes, secret: str = SECRET) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def push_body(branch: str, after: str = HEAD, default: str = "trunk") -> dict[str, Any]:
    return {"ref": f"refs/heads/{branch}", "before": "0" * 40, "after": after,
            "repository": {"full_name": "acme/widget", "default_branch": default}}


def github(client: FlaskClient, event: str, payload: dict[str, Any], *,
           signature: str | None = "ok", project: str = "widget",
           delivery: str | None = None) -> Any:
    body = json.dumps(payload).encode()
    # every delivery has its own id (a repeated one is a replay, answered "duplicate")
    headers = {"X-GitHub-Event": event, "X-GitHub-Delivery": delivery or uuid.uuid4().hex}
    if signature == "ok":
        headers["X-Hub-Signature-256"] = "sha256=" + sign(body)
    elif signature is not None:
        headers["X-Hub-Signature-256"] = signature
    return client.post(f"/api/v1/webhooks/{project}/github", data=body, headers=headers,
                       content_type="application/json")


def test_a_signed_push_triggers_the_jobsets_on_that_branch(
        client: FlaskClient, world: dict[str, Any], db: Session) -> None:
    answer = github(client, "push", push_body("main"), delivery="d-1")
    assert answer.status_code == 200, answer.json
    assert answer.json["action"] == "triggered"
    (evaluation,) = evaluations(db)
    assert evaluation.jobset_id == world["main"].id  # not the disabled one on main
    assert evaluation.trigger_kind is TriggerKind.webhook
    assert evaluation.requested_by == "github webhook d-1"
    assert evaluation.pr_number is None
    assert answer.json["evaluations"] == [
        {"jobset": "main", "jobset_id": world["main"].id, "evaluation_id": evaluation.id,
         "created": True, "message": "evaluation queued"}]
    (audit,) = audits(db)
    assert audit.actor == "webhook:github"
    assert audit.target == "project:widget/webhook:github"
    assert audit.details["evaluations"] == [evaluation.id]
    assert audit.details["branch"] == "main"

    # other branches: nothing for main; a jobset without branch follows the default branch
    assert github(client, "push", push_body("feature")).json["action"] == "ignored"
    assert github(client, "push", push_body("trunk")).json["action"] == "triggered"
    assert [e.jobset_id for e in evaluations(db)] == [world["main"].id, world["default"].id]
    # tags and deleted branches are ignored
    tag = {**push_body("main"), "ref": "refs/tags/v1"}
    assert github(client, "push", tag).json["action"] == "ignored"
    assert github(client, "push", push_body("release", after="0" * 40)).json["action"] == \
        "ignored"
    assert len(evaluations(db)) == 2


@pytest.mark.parametrize(("signature", "status"), [
    (None, 401),
    ("sha256=" + "0" * 64, 403),
    ("sha1=abc", 403),
    ("sha256=" + hmac.new(b"wrong secret", b"{}", hashlib.sha256).hexdigest(), 403),
])
def test_bad_or_missing_signatures_are_refused(signature: str | None, status: int,
                                               client: FlaskClient, world: dict[str, Any],
                                               db: Session) -> None:
    answer = github(client, "push", push_body("main"), signature=signature)
    assert answer.status_code == status
    assert answer.json["error"]
    assert evaluations(db) == []
    assert audits(db) == []


def test_the_signature_covers_the_exact_body(client: FlaskClient, world: dict[str, Any],
                                             db: Session) -> None:
    body = json.dumps(push_body("main")).encode()
    tampered = body.replace(b"main", b"release")
    answer = client.post("/api/v1/webhooks/widget/github", data=tampered,
                         headers={"X-GitHub-Event": "push",
                                  "X-Hub-Signature-256": "sha256=" + sign(body)},
                         content_type="application/json")
    assert answer.status_code == 403
    assert evaluations(db) == []


def test_form_encoded_github_deliveries_need_no_csrf_token(
        client: FlaskClient, world: dict[str, Any], db: Session) -> None:
    body = urlencode({"payload": json.dumps(push_body("release"))}).encode()
    answer = client.post("/api/v1/webhooks/widget/github", data=body,
                         headers={"X-GitHub-Event": "push",
                                  "X-Hub-Signature-256": "sha256=" + sign(body)},
                         content_type="application/x-www-form-urlencoded")
    assert answer.status_code == 200, answer.json
    assert [e.jobset_id for e in evaluations(db)] == [world["release"].id]


def test_other_form_posts_still_need_csrf(client: FlaskClient, world: dict[str, Any]) -> None:
    answer = client.post("/api/v1/projects", data={"name": "x"},
                         content_type="application/x-www-form-urlencoded")
    assert answer.status_code == 400
    assert "CSRF" in answer.json["error"]


def test_pull_requests_create_pr_evaluations(client: FlaskClient, world: dict[str, Any],
                                             db: Session) -> None:
    payload = {"action": "opened", "number": 42,
               "pull_request": {"head": {"ref": "feature/x", "sha": PR_HEAD},
                                "base": {"ref": "main"}},
               "repository": {"default_branch": "trunk"}}
    answer = github(client, "pull_request", payload)
    assert answer.status_code == 200, answer.json
    (evaluation,) = evaluations(db)
    assert evaluation.jobset_id == world["main"].id
    assert (evaluation.pr_number, evaluation.pr_head_branch, evaluation.pr_base_branch,
            evaluation.pr_action) == (42, "feature/x", "main", "opened")
    assert evaluation.commit_hash == PR_HEAD
    assert evaluation.trigger_kind is TriggerKind.webhook
    closed = {**payload, "action": "closed"}
    assert github(client, "pull_request", closed).json["action"] == "ignored"
    assert len(evaluations(db)) == 1


def test_ping_answers_pong(client: FlaskClient, world: dict[str, Any], db: Session) -> None:
    answer = github(client, "ping", {"zen": "Keep it logically awesome.", "hook_id": 1})
    assert answer.status_code == 200
    assert answer.json["action"] == "pong"
    assert len(audits(db)) == 1
    assert github(client, "ping", {}, signature=None).status_code == 401


def test_gitlab_token(client: FlaskClient, world: dict[str, Any], db: Session) -> None:
    body = json.dumps({"object_kind": "push", **push_body("release"),
                       "project": {"default_branch": "trunk"}}).encode()

    def post(token: str | None, event: str = "Push Hook", data: bytes = body) -> Any:
        headers = {"X-Gitlab-Event": event}
        if token is not None:
            headers["X-Gitlab-Token"] = token
        return client.post("/api/v1/webhooks/widget/gitlab", data=data, headers=headers,
                           content_type="application/json")

    assert post(None).status_code == 401
    assert post("not the secret").status_code == 403
    assert evaluations(db) == []
    answer = post(SECRET)
    assert answer.status_code == 200, answer.json
    assert [e.jobset_id for e in evaluations(db)] == [world["release"].id]

    merge_request = {"object_kind": "merge_request", "object_attributes": {
        "action": "update", "iid": 7, "source_branch": "fix", "target_branch": "trunk",
        "last_commit": {"id": PR_HEAD}, "oldrev": "a" * 40}, "project": {
        "default_branch": "trunk"}}
    answer = post(SECRET, "Merge Request Hook", json.dumps(merge_request).encode())
    assert answer.status_code == 200, answer.json
    pr = evaluations(db)[-1]
    assert (pr.jobset_id, pr.pr_number, pr.pr_head_branch, pr.commit_hash) == \
        (world["default"].id, 7, "fix", PR_HEAD)
    # an edit without new commits triggers nothing
    del merge_request["object_attributes"]["oldrev"]
    answer = post(SECRET, "Merge Request Hook", json.dumps(merge_request).encode())
    assert answer.json["action"] == "ignored"


@pytest.mark.parametrize(("forge", "header"), [("gitea", "X-Gitea-Signature"),
                                               ("forgejo", "X-Forgejo-Signature")])
def test_gitea_and_forgejo_signatures(forge: str, header: str, client: FlaskClient,
                                      world: dict[str, Any], db: Session) -> None:
    body = json.dumps(push_body("main")).encode()
    event = f"X-{forge.capitalize()}-Event"

    def post(signature: str) -> Any:
        return client.post(f"/api/v1/webhooks/widget/{forge}", data=body,
                           headers={event: "push", header: signature},
                           content_type="application/json")

    assert post(sign(body, "other")).status_code == 403
    assert evaluations(db) == []
    answer = post(sign(body))
    assert answer.status_code == 200, answer.json
    assert [e.jobset_id for e in evaluations(db)] == [world["main"].id]
    pull = {"action": "synchronized", "number": 3,
            "pull_request": {"head": {"ref": "topic", "sha": PR_HEAD}, "base": {"ref": "release"}}}
    raw = json.dumps(pull).encode()
    answer = client.post(f"/api/v1/webhooks/widget/{forge}", data=raw,
                         headers={event: "pull_request", header: sign(raw)},
                         content_type="application/json")
    assert answer.status_code == 200, answer.json
    assert evaluations(db)[-1].pr_number == 3


def test_unknown_targets_are_404(client: FlaskClient, world: dict[str, Any],
                                 db: Session) -> None:
    assert github(client, "push", push_body("main"), project="nope").status_code == 404
    assert client.post("/api/v1/webhooks/widget/bitbucket", data=b"{}").status_code == 404
    hook = db.scalar(select(WebhookConfig).where(WebhookConfig.forge_type == ForgeType.github))
    assert hook is not None
    hook.enabled = False
    db.commit()
    answer = github(client, "push", push_body("main"))
    assert answer.status_code == 404
    assert answer.json["error"] == "no enabled github webhook for project widget"
    assert evaluations(db) == []


def test_a_webhook_without_secret_accepts_nothing(client: FlaskClient, world: dict[str, Any],
                                                  db: Session) -> None:
    project = db.scalar(select(Project).where(Project.name == "widget"))
    assert project is not None
    hook = db.scalar(select(WebhookConfig).where(WebhookConfig.forge_type == ForgeType.gitlab))
    assert hook is not None
    hook.secret_encrypted = None
    db.commit()
    answer = client.post("/api/v1/webhooks/widget/gitlab", data=b"{}",
                         headers={"X-Gitlab-Event": "Push Hook", "X-Gitlab-Token": ""},
                         content_type="application/json")
    assert answer.status_code == 403
    assert "no usable secret" in answer.json["error"]


@pytest.mark.parametrize("body", [
    b"not json", b"[1, 2]", b"\xff\xfe", json.dumps({"ref": "refs/heads/main"}).encode(),
    json.dumps({"ref": "refs/heads/main", "after": "xyz"}).encode(),
    json.dumps({"ref": "refs/heads/-rf", "after": HEAD}).encode(),
    json.dumps({"ref": 5, "after": HEAD}).encode(),
])
def test_malformed_signed_bodies_are_400(body: bytes, client: FlaskClient,
                                         world: dict[str, Any], db: Session) -> None:
    answer = client.post("/api/v1/webhooks/widget/github", data=body,
                         headers={"X-GitHub-Event": "push",
                                  "X-Hub-Signature-256": "sha256=" + sign(body)},
                         content_type="application/json")
    assert answer.status_code == 400, answer.json
    assert answer.json["error"]
    assert evaluations(db) == []


def test_missing_event_header_is_400(client: FlaskClient, world: dict[str, Any]) -> None:
    body = json.dumps(push_body("main")).encode()
    answer = client.post("/api/v1/webhooks/widget/github", data=body,
                         headers={"X-Hub-Signature-256": "sha256=" + sign(body)},
                         content_type="application/json")
    assert answer.status_code == 400
    assert "X-GitHub-Event" in answer.json["error"]


def test_a_disabled_project_triggers_nothing(client: FlaskClient, world: dict[str, Any],
                                             db: Session) -> None:
    world["project"].enabled = False
    db.commit()
    answer = github(client, "push", push_body("main"))
    assert answer.status_code == 200
    (result,) = answer.json["evaluations"]
    assert result["evaluation_id"] is None
    assert "disabled" in result["message"]
    assert evaluations(db) == []
    assert db.get(Jobset, world["main"].id) is not None
