"""Receiving a forge delivery: find the hook, verify it, trigger evaluations, audit.

Pushes trigger every enabled jobset of the project on the pushed branch (a
jobset without a branch follows the repository's default branch, when the
forge names it). Pull/merge requests (opened, new commits, reopened) create
pull-request evaluations of the jobsets on the request's base branch, pinned
to the head commit. Every accepted delivery writes one audit row.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from circus import audit
from circus.auth.actor import Actor
from circus.auth.sealing import unseal
from circus.common.config import Settings
from circus.common.enums import ActorKind, ForgeType, JobsetState, TriggerKind
from circus.common.errors import Conflict, NotFound, PermissionDenied, Unauthenticated
from circus.common.models import Jobset, Project, WebhookConfig
from circus.evaluator import service as evaluator
from circus.projects import service as projects
from circus.webhooks import events, signatures
from circus.webhooks.events import ForgeEvent

#: how long a delivery is remembered (its id and its body's digest): a replay within it
#: is answered "duplicate"
REPLAY_WINDOW_DAYS = 30


@dataclass
class Received:
    event: str
    #: triggered, ignored, pong or duplicate
    action: str
    message: str
    evaluations: list[dict[str, Any]] = field(default_factory=list)


def find_hook(session: Session, project_ref: str, forge: str) -> tuple[Project, WebhookConfig]:
    """The project's enabled webhook for ``forge`` (one 404 for every reason: the
    caller is unauthenticated, so it learns nothing about which projects exist)."""
    missing = NotFound(f"no enabled {forge} webhook for project {project_ref}")
    try:
        forge_type = ForgeType(forge)
        project = projects.get_project(session, project_ref)
    except (ValueError, NotFound):
        raise missing from None
    hook = session.scalar(select(WebhookConfig).where(
        WebhookConfig.project_id == project.id, WebhookConfig.forge_type == forge_type,
        WebhookConfig.enabled.is_(True)))
    if hook is None:
        raise missing
    return project, hook


def receive(session: Session, settings: Settings, *, project_ref: str, forge: str,
            headers: Mapping[str, str], body: bytes, remote_addr: str | None) -> Received:
    """Handle one delivery (caller commits). ``headers`` has lower-case names.

    Raises ``NotFound`` (no such enabled hook), ``Unauthenticated``/``PermissionDenied``
    (signature), ``InvalidInput`` (malformed body).
    """
    project, hook = find_hook(session, project_ref, forge)
    try:
        secret = unseal(settings.server.secret_key or "", hook.secret_encrypted) \
            if hook.secret_encrypted else None
        if not secret:
            raise PermissionDenied(
                "this webhook has no usable secret (none set, or server.secret_key changed): "
                "deliveries cannot be verified, so none is accepted")
        signatures.verify(hook.forge_type, secret, headers, body)
    except (Unauthenticated, PermissionDenied):
        # only who holds the secret learns that a hidden project exists: everyone else
        # gets the answer of a project without this webhook
        if project.hidden:
            raise NotFound(f"no enabled {forge} webhook for project {project_ref}") from None
        raise
    event = events.parse(hook.forge_type, headers, body)
    delivery = (headers.get("x-github-delivery") or headers.get("x-gitea-delivery")
                or headers.get("x-forgejo-delivery") or headers.get("x-gitlab-event-uuid"))
    actor = Actor(ActorKind.system, name=f"webhook:{hook.forge_type.value}",
                  remote_addr=remote_addr)
    requested_by = f"{hook.forge_type.value} webhook" + (f" {delivery}" if delivery else "")
    target = f"project:{project.name}/webhook:{hook.forge_type.value}"
    body_digest = hashlib.sha256(body).hexdigest()
    if _already_received(session, hook.id, target, delivery and delivery[:200], body_digest):
        # a replayed (or redelivered) delivery: signed, but it must not trigger twice
        return Received(event.name, "duplicate",
                        f"delivery {(delivery or body_digest)[:200]} was already received: "
                        "ignored")
    if event.kind == "ping":
        result = Received(event.name, "pong", "pong")
    elif event.kind == "push":
        result = _push(session, project, event, requested_by)
    elif event.kind == "pull_request":
        result = _pull_request(session, project, event, requested_by)
    else:
        result = Received(event.name, "ignored", event.reason or "ignored")
    audit.record(session, actor, "webhook.receive", target,
                 {"event": event.name, "delivery": delivery and delivery[:200],
                  "body_sha256": body_digest, "action": result.action,
                  "branch": event.branch or event.base_branch, "commit": event.commit,
                  "pull_request": event.pr_number,
                  "evaluations": [e["evaluation_id"] for e in result.evaluations
                                  if e.get("evaluation_id") is not None]})
    return result


def _already_received(session: Session, hook_id: int, target: str, delivery: str | None,
                      body_digest: str) -> bool:
    """Whether this hook accepted a delivery with this id, or with this very body, within
    ``REPLAY_WINDOW_DAYS``.

    The signature covers the body only: a captured delivery replayed under a new (or
    without a) delivery id header is still the body already accepted. A forge's
    deliveries differ in their bodies (commits, timestamps). The accepted deliveries'
    audit rows are the record (no extra table); transaction-scoped advisory locks per
    (hook, delivery id) and (hook, body) make two copies sent at once wait for each
    other, so the second sees the first's committed row.
    """
    for name in ([delivery] if delivery else []) + [f"body:{body_digest}"]:
        key = hashlib.blake2b(f"webhook:{hook_id}:{name}".encode(), digest_size=8).digest()
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"),
                        {"key": int.from_bytes(key, "big", signed=True)})
    return session.execute(text("""
        SELECT 1 FROM audit_log
        WHERE action = 'webhook.receive' AND target = :target
          AND (details->>'delivery' = :delivery OR details->>'body_sha256' = :body)
          AND at > now() - make_interval(days => :days)
        LIMIT 1
    """), {"target": target, "delivery": delivery, "body": body_digest,
           "days": REPLAY_WINDOW_DAYS}).first() is not None


def _jobsets_on(session: Session, project: Project, branch: str, default_branch: str | None
                ) -> list[Jobset]:
    jobsets = session.scalars(select(Jobset).where(
        Jobset.project_id == project.id, Jobset.state != JobsetState.disabled)
        .order_by(Jobset.id)).all()
    return [j for j in jobsets
            if j.branch == branch or (not j.branch and default_branch == branch)]


def _trigger(session: Session, jobset: Jobset, requested_by: str,
             pull_request: evaluator.PullRequest | None = None) -> dict[str, Any]:
    try:
        evaluation, created = evaluator.trigger(session, jobset.id, TriggerKind.webhook,
                                                requested_by=requested_by,
                                                pull_request=pull_request)
    except Conflict as exc:
        return {"jobset": jobset.name, "jobset_id": jobset.id, "evaluation_id": None,
                "created": False, "message": exc.message}
    session.flush()
    return {"jobset": jobset.name, "jobset_id": jobset.id, "evaluation_id": evaluation.id,
            "created": created,
            "message": "evaluation queued" if created else
            "the jobset already has a pending or running evaluation"}


def _push(session: Session, project: Project, event: ForgeEvent, requested_by: str
          ) -> Received:
    assert event.branch is not None
    jobsets = _jobsets_on(session, project, event.branch, event.default_branch)
    if not jobsets:
        return Received(event.name, "ignored",
                        f"no enabled jobset of {project.name} builds branch {event.branch}")
    results = [_trigger(session, jobset, requested_by) for jobset in jobsets]
    return Received(event.name, "triggered",
                    f"push to {event.branch}: {len(results)} jobset(s)", results)


def _pull_request(session: Session, project: Project, event: ForgeEvent, requested_by: str
                  ) -> Received:
    assert event.base_branch is not None and event.head_branch is not None
    assert event.pr_number is not None and event.pr_action is not None
    jobsets = _jobsets_on(session, project, event.base_branch, event.default_branch)
    if not jobsets:
        return Received(event.name, "ignored",
                        f"no enabled jobset of {project.name} builds branch "
                        f"{event.base_branch}, the request's base")
    pull_request = evaluator.PullRequest(event.pr_number, event.head_branch,
                                         event.base_branch, event.pr_action,
                                         head_sha=event.commit)
    results = [_trigger(session, jobset, requested_by, pull_request) for jobset in jobsets]
    return Received(event.name, "triggered",
                    f"pull request #{event.pr_number}: {len(results)} jobset(s)", results)
