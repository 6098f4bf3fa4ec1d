"""Projects, jobsets, inputs, channels, members, webhook and notification configs.

Every function takes the session first and the acting :class:`Actor`, checks
the actor's permission, makes the change and records one audit row (an update
that changes nothing records none). Callers commit. The API, the dashboard and
the declarative configuration (:mod:`circus.declarative`, as a system actor)
all write through here; ``managed`` marks the declarative configuration's rows.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import select
from sqlalchemy.orm import Session

from circus import audit
from circus.auth import sealing
from circus.auth.actor import Actor
from circus.auth.permissions import Action, require_permission
from circus.common import localsource
from circus.common.enums import (
    ChannelMode,
    ForgeType,
    InputType,
    JobsetState,
    MemberRole,
    NotificationType,
)
from circus.common.errors import Conflict, InvalidInput, NotFound, PermissionDenied
from circus.common.models import (
    Channel,
    Evaluation,
    Jobset,
    JobsetInput,
    NotificationConfig,
    Project,
    ProjectMember,
    User,
    WebhookConfig,
)
from circus.notifications.service import validate_config
from circus.projects import channels
from circus.rows import apply_changes, apply_managed, insert_unique

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
PROJECT_FIELDS = ("description", "repository_url", "enabled", "hidden", "cache_enabled",
                  "owner_id")
JOBSET_FIELDS = ("description", "nix_expression", "nix_expression_input", "flake_mode", "branch",
                 "state", "trigger_mode", "check_interval", "scheduling_shares", "keep_nr",
                 "hidden", "check_reproducibility")


#: what a name may be, as every refusal says it
NAME_RULE = "letters, digits, '.', '_' and '-', starting with a letter or digit, at most 128"


def check_name(name: str, field: str = "name") -> None:
    if not NAME_RE.match(name or ""):
        raise InvalidInput(f"invalid {field}", {field: [NAME_RULE]})


def check_repository_url(url: str, allowed_schemes: Sequence[str]) -> None:
    if not url or url.startswith("/"):
        return
    try:
        scheme = urlsplit(url).scheme
    except ValueError:
        scheme = ""
    if scheme.startswith("git+"):
        scheme = scheme[4:]
    if scheme not in allowed_schemes:
        raise InvalidInput("repository URL scheme not allowed", {"repository_url": [
            f"scheme must be one of {', '.join(allowed_schemes)} (got {url!r})"]})


def check_server_path(actor: Actor, path: str | None, location: str,
                      allowed_paths: Sequence[str], field: str) -> None:
    """``path`` inputs and ``file://`` repositories read the server's disk: a 403
    unless ``actor`` is an admin or ``path`` is under ``evaluator.allowed_path_inputs``."""
    if path is None or actor.is_admin or localsource.is_allowed(path, allowed_paths):
        return
    raise PermissionDenied("server paths need an admin", {field: [localsource.refusal(location)]})


# ---------------------------------------------------------------------------
# lookups: by numeric id or by name


def get_project(session: Session, ref: int | str) -> Project:
    project = (session.get(Project, int(ref)) if _is_id(ref)
               else session.scalar(select(Project).where(Project.name == str(ref))))
    if project is None:
        raise NotFound(f"no project {ref}")
    return project


def get_jobset(session: Session, project: Project, ref: int | str) -> Jobset:
    query = select(Jobset).where(Jobset.project_id == project.id)
    query = query.where(Jobset.id == int(ref)) if _is_id(ref) else query.where(
        Jobset.name == str(ref))
    jobset = session.scalar(query)
    if jobset is None:
        raise NotFound(f"no jobset {ref} in project {project.name}")
    return jobset


def get_jobset_by_id(session: Session, jobset_id: int) -> Jobset:
    jobset = session.get(Jobset, jobset_id)
    if jobset is None:
        raise NotFound(f"no jobset with id {jobset_id}")
    return jobset


def get_channel(session: Session, ref: int | str) -> Channel:
    channel = (session.get(Channel, int(ref)) if _is_id(ref)
               else session.scalar(select(Channel).where(Channel.name == str(ref))))
    if channel is None:
        raise NotFound(f"no channel {ref}")
    return channel


def _is_id(ref: int | str) -> bool:
    return isinstance(ref, int) or (ref.isdigit() and len(ref) < 19)


def _user(session: Session, user_id: int | None = None, username: str | None = None) -> User:
    user = (session.get(User, user_id) if user_id is not None
            else session.scalar(select(User).where(User.username == username)))
    if user is None:
        raise NotFound(f"no user {user_id if user_id is not None else username}")
    return user


# ---------------------------------------------------------------------------
# projects


def create_project(session: Session, actor: Actor, *, name: str, description: str = "",
                   repository_url: str = "", enabled: bool = True, hidden: bool = False,
                   cache_enabled: bool = True, owner_id: int | None = None,
                   allowed_schemes: Sequence[str] = ("https", "http", "ssh", "git", "file"),
                   managed: bool = False, allowed_paths: Sequence[str] = ()) -> Project:
    require_permission(session, actor, Action.project_create)
    check_name(name)
    check_repository_url(repository_url, allowed_schemes)
    check_server_path(actor, localsource.repository_path(repository_url), repository_url,
                      allowed_paths, "repository_url")
    if session.scalar(select(Project.id).where(Project.name == name)) is not None:
        raise Conflict(f"project {name!r} already exists", {"name": name})
    if owner_id is not None:
        _user(session, owner_id)
    project = Project(name=name, description=description, repository_url=repository_url,
                      enabled=enabled, hidden=hidden, cache_enabled=cache_enabled,
                      owner_id=owner_id if owner_id is not None else actor.user_id,
                      managed_declaratively=managed)
    insert_unique(session, project, f"project {name!r} already exists", {"name": name})
    audit.record(session, actor, "project.create", f"project:{name}",
                 {"repository_url": repository_url})
    return project


def update_project(session: Session, actor: Actor, project: Project, changes: dict[str, Any],
                   allowed_schemes: Sequence[str] = ("https", "http", "ssh", "git", "file"),
                   allowed_paths: Sequence[str] = (), managed: bool | None = None) -> Project:
    require_permission(session, actor, Action.project_update, project.id)
    if "repository_url" in changes:
        url = changes["repository_url"]
        check_repository_url(url, allowed_schemes)
        if url != project.repository_url:  # an admin's choice stays editable
            check_server_path(actor, localsource.repository_path(url), url, allowed_paths,
                              "repository_url")
    if "owner_id" in changes and changes["owner_id"] != project.owner_id:
        # the owner counts as the project's admin: choosing it is managing members
        require_permission(session, actor, Action.member_manage, project.id)
    if changes.get("owner_id") is not None:
        _user(session, changes["owner_id"])
    applied = apply_changes(project, changes, PROJECT_FIELDS)
    new_name = changes.get("name")
    if new_name is not None and new_name != project.name:
        check_name(new_name)
        if session.scalar(select(Project.id).where(Project.name == new_name)) is not None:
            raise Conflict(f"project {new_name!r} already exists", {"name": new_name})
        project.name = new_name
        applied["name"] = new_name
    applied |= apply_managed(project, managed)
    if applied:
        audit.record(session, actor, "project.update", f"project:{project.name}", applied)
    return project


def delete_project(session: Session, actor: Actor, project: Project) -> None:
    require_permission(session, actor, Action.project_delete, project.id)
    if project.managed_declaratively:
        raise Conflict(f"project {project.name!r} is managed by the declarative configuration",
                       {"hint": "remove it from [declarative] (it is then disabled)"})
    session.delete(project)
    audit.record(session, actor, "project.delete", f"project:{project.name}")


# ---------------------------------------------------------------------------
# jobsets and inputs


def _jobset_values(values: dict[str, Any]) -> dict[str, Any]:
    """Map the API's ``enabled`` flag onto ``state`` (which says more)."""
    values = dict(values)
    enabled = values.pop("enabled", None)
    if enabled is not None and "state" not in values:
        values["state"] = JobsetState.enabled if enabled else JobsetState.disabled
    for key in ("check_interval", "keep_nr"):
        if key in values and values[key] is not None and values[key] < 0:
            raise InvalidInput(f"invalid {key}", {key: ["must be >= 0"]})
    if values.get("scheduling_shares") is not None and values["scheduling_shares"] < 1:
        raise InvalidInput("invalid scheduling_shares", {"scheduling_shares": ["must be >= 1"]})
    return values


def create_jobset(session: Session, actor: Actor, project: Project, *, name: str,
                  managed: bool = False, **values: Any) -> Jobset:
    require_permission(session, actor, Action.jobset_manage, project.id)
    check_name(name)
    values = _jobset_values(values)
    unknown = set(values) - set(JOBSET_FIELDS)
    if unknown:
        raise InvalidInput("unknown jobset fields", {k: ["unknown field"] for k in unknown})
    if session.scalar(select(Jobset.id).where(Jobset.project_id == project.id,
                                              Jobset.name == name)) is not None:
        raise Conflict(f"jobset {name!r} already exists in {project.name}", {"name": name})
    jobset = Jobset(project_id=project.id, name=name, managed_declaratively=managed,
                    **{k: v for k, v in values.items() if v is not None or k in (
                        "branch", "nix_expression_input")})
    insert_unique(session, jobset, f"jobset {name!r} already exists", {"name": name})
    audit.record(session, actor, "jobset.create", f"jobset:{project.name}/{name}",
                 {k: v for k, v in values.items() if v is not None})
    return jobset


def update_jobset(session: Session, actor: Actor, jobset: Jobset, changes: dict[str, Any],
                  *, managed: bool | None = None) -> Jobset:
    require_permission(session, actor, Action.jobset_manage, jobset.project_id)
    changes = _jobset_values(changes)
    applied = apply_changes(jobset, changes, JOBSET_FIELDS)
    new_name = changes.get("name")
    if new_name is not None and new_name != jobset.name:
        check_name(new_name)
        if session.scalar(select(Jobset.id).where(Jobset.project_id == jobset.project_id,
                                                  Jobset.name == new_name)) is not None:
            raise Conflict(f"jobset {new_name!r} already exists", {"name": new_name})
        jobset.name = new_name
        applied["name"] = new_name
    applied |= apply_managed(jobset, managed)
    if applied:
        audit.record(session, actor, "jobset.update", f"jobset:{jobset.id}", applied)
    return jobset


def delete_jobset(session: Session, actor: Actor, jobset: Jobset) -> None:
    require_permission(session, actor, Action.jobset_manage, jobset.project_id)
    if jobset.managed_declaratively:
        raise Conflict(f"jobset {jobset.name!r} is managed by the declarative configuration")
    session.delete(jobset)
    audit.record(session, actor, "jobset.delete", f"jobset:{jobset.id}", {"name": jobset.name})


def get_input(session: Session, jobset: Jobset, name: str) -> JobsetInput:
    row = session.scalar(select(JobsetInput).where(JobsetInput.jobset_id == jobset.id,
                                                   JobsetInput.name == name))
    if row is None:
        raise NotFound(f"no input {name!r} in jobset {jobset.name}")
    return row


def _check_input(actor: Actor, input_type: InputType, value: str,
                 allowed_paths: Sequence[str]) -> None:
    if input_type is InputType.boolean and value not in ("true", "false"):
        raise InvalidInput("invalid boolean input", {"value": ["must be true or false"]})
    if input_type is InputType.path:
        if not value.startswith("/"):
            raise InvalidInput("invalid path input", {"value": ["must be an absolute path"]})
        check_server_path(actor, value, value, allowed_paths, "value")
    elif input_type is InputType.git:
        check_server_path(actor, localsource.git_input_path(value), value, allowed_paths,
                          "value")


def add_input(session: Session, actor: Actor, jobset: Jobset, *, name: str,
              input_type: InputType, value: str = "", revision: str | None = None,
              allowed_paths: Sequence[str] = ()) -> JobsetInput:
    require_permission(session, actor, Action.jobset_manage, jobset.project_id)
    check_name(name)
    _check_input(actor, input_type, value, allowed_paths)
    if session.scalar(select(JobsetInput.id).where(JobsetInput.jobset_id == jobset.id,
                                                   JobsetInput.name == name)) is not None:
        raise Conflict(f"input {name!r} already exists", {"name": name})
    row = JobsetInput(jobset_id=jobset.id, name=name, input_type=input_type, value=value,
                      revision=revision)
    insert_unique(session, row, f"input {name!r} already exists", {"name": name})
    audit.record(session, actor, "input.create", f"jobset:{jobset.id}/input:{name}",
                 {"type": input_type.value, "value": value})
    return row


def update_input(session: Session, actor: Actor, jobset: Jobset, row: JobsetInput, *,
                 input_type: InputType, value: str, allowed_paths: Sequence[str] = ()
                 ) -> JobsetInput:
    """Give an input another type or value, checked as :func:`add_input` checks them."""
    require_permission(session, actor, Action.jobset_manage, jobset.project_id)
    _check_input(actor, input_type, value, allowed_paths)
    applied = apply_changes(row, {"input_type": input_type, "value": value},
                            ("input_type", "value"))
    if applied:
        audit.record(session, actor, "input.update", f"jobset:{jobset.id}/input:{row.name}",
                     applied)
    return row


def delete_input(session: Session, actor: Actor, jobset: Jobset, name: str) -> None:
    require_permission(session, actor, Action.jobset_manage, jobset.project_id)
    row = get_input(session, jobset, name)
    session.delete(row)
    audit.record(session, actor, "input.delete", f"jobset:{jobset.id}/input:{name}")


# ---------------------------------------------------------------------------
# webhooks and notifications


def get_webhook(session: Session, project: Project, webhook_id: int) -> WebhookConfig:
    row = session.get(WebhookConfig, webhook_id)
    if row is None or row.project_id != project.id:
        raise NotFound(f"no webhook {webhook_id} in project {project.name}")
    return row


def create_webhook(session: Session, actor: Actor, project: Project, *, forge_type: ForgeType,
                   secret: str | None, server_key: str, enabled: bool = True,
                   managed: bool = False) -> WebhookConfig:
    require_permission(session, actor, Action.hooks_manage, project.id)
    if session.scalar(select(WebhookConfig.id).where(
            WebhookConfig.project_id == project.id,
            WebhookConfig.forge_type == forge_type)) is not None:
        raise Conflict(f"project {project.name} already has a {forge_type.value} webhook")
    row = WebhookConfig(project_id=project.id, forge_type=forge_type, enabled=enabled,
                        secret_encrypted=sealing.seal(server_key, secret) if secret else None,
                        managed_declaratively=managed)
    insert_unique(session, row, f"project already has a {forge_type.value} webhook")
    audit.record(session, actor, "webhook.create", f"project:{project.name}/webhook:{row.id}",
                 {"forge_type": forge_type.value, "has_secret": bool(secret)})
    return row


def update_webhook(session: Session, actor: Actor, project: Project, row: WebhookConfig,
                   changes: dict[str, Any], *, server_key: str, managed: bool | None = None
                   ) -> WebhookConfig:
    """Enable or disable a webhook, or (``secret`` in ``changes``) set its secret."""
    require_permission(session, actor, Action.hooks_manage, project.id)
    applied = apply_changes(row, changes, ("enabled",))
    if "secret" in changes:
        secret = changes["secret"]
        current = (sealing.unseal(server_key, row.secret_encrypted) if row.secret_encrypted
                   else None)
        if current != secret:
            # sealing is randomised: re-seal only when the secret really changed
            row.secret_encrypted = sealing.seal(server_key, secret) if secret else None
            applied["secret"] = "changed"
    applied |= apply_managed(row, managed)
    if applied:
        audit.record(session, actor, "webhook.update",
                     f"project:{project.name}/webhook:{row.id}", applied)
    return row


def delete_webhook(session: Session, actor: Actor, project: Project, webhook_id: int) -> None:
    require_permission(session, actor, Action.hooks_manage, project.id)
    row = get_webhook(session, project, webhook_id)
    session.delete(row)
    audit.record(session, actor, "webhook.delete", f"project:{project.name}/webhook:{row.id}")


def create_notification(session: Session, actor: Actor, project: Project, *,
                        type: NotificationType, config: dict[str, Any], enabled: bool = True,
                        managed: bool = False) -> NotificationConfig:
    require_permission(session, actor, Action.hooks_manage, project.id)
    validate_config(type, config, server_side=managed)
    row = NotificationConfig(project_id=project.id, type=type, config=config, enabled=enabled,
                             managed_declaratively=managed)
    session.add(row)
    session.flush()
    audit.record(session, actor, "notification.create",
                 f"project:{project.name}/notification:{row.id}", {"type": type.value})
    return row


def update_notification(session: Session, actor: Actor, project: Project,
                        row: NotificationConfig, *, enabled: bool) -> NotificationConfig:
    require_permission(session, actor, Action.hooks_manage, project.id)
    applied = apply_changes(row, {"enabled": enabled}, ("enabled",))
    if applied:
        audit.record(session, actor, "notification.update",
                     f"project:{project.name}/notification:{row.id}", applied)
    return row


def delete_notification(session: Session, actor: Actor, project: Project, config_id: int
                        ) -> None:
    require_permission(session, actor, Action.hooks_manage, project.id)
    row = session.get(NotificationConfig, config_id)
    if row is None or row.project_id != project.id:
        raise NotFound(f"no notification config {config_id} in project {project.name}")
    session.delete(row)
    audit.record(session, actor, "notification.delete",
                 f"project:{project.name}/notification:{config_id}")


# ---------------------------------------------------------------------------
# channels


def create_channel(session: Session, actor: Actor, jobset: Jobset, *, name: str,
                   mode: ChannelMode | str = ChannelMode.manual,
                   aggregate_job: str | None = None, managed: bool = False) -> Channel:
    require_permission(session, actor, Action.jobset_manage, jobset.project_id)
    check_name(name)
    mode, aggregate_job = channels.check_settings(mode, aggregate_job)
    if session.scalar(select(Channel.id).where(Channel.name == name)) is not None:
        raise Conflict(f"channel {name!r} already exists", {"name": name})
    channel = Channel(project_id=jobset.project_id, jobset_id=jobset.id, name=name,
                      mode=mode, aggregate_job=aggregate_job, managed_declaratively=managed)
    insert_unique(session, channel, f"channel {name!r} already exists", {"name": name})
    audit.record(session, actor, "channel.create", f"channel:{name}",
                 {"jobset_id": jobset.id, "mode": mode, "aggregate_job": aggregate_job})
    channels.advance_channels(session, jobset.id)
    return channel


def update_channel(session: Session, actor: Actor, channel: Channel, changes: dict[str, Any],
                   *, jobset: Jobset | None = None, managed: bool | None = None) -> Channel:
    """Change how the channel moves (``mode``, ``aggregate_job`` in ``changes``; absent
    keys stay) and, declaratively, its jobset. An automatic channel catches up at once."""
    require_permission(session, actor, Action.jobset_manage, channel.project_id)
    new_mode, new_job = channels.check_settings(changes.get("mode", channel.mode),
                                                changes.get("aggregate_job",
                                                            channel.aggregate_job))
    values: dict[str, Any] = {"mode": new_mode, "aggregate_job": new_job}
    if jobset is not None:
        if jobset.project_id != channel.project_id:
            raise InvalidInput("the jobset belongs to another project",
                               {"jobset_id": [f"not a jobset of project {channel.project_id}"]})
        values["jobset_id"] = jobset.id
    changed = apply_changes(channel, values, values.keys()) | apply_managed(channel, managed)
    if changed:
        audit.record(session, actor, "channel.update", f"channel:{channel.name}", changed)
        session.flush()
    channels.advance_channels(session, channel.jobset_id)
    return channel


def delete_channel(session: Session, actor: Actor, channel: Channel) -> None:
    require_permission(session, actor, Action.jobset_manage, channel.project_id)
    session.delete(channel)
    audit.record(session, actor, "channel.delete", f"channel:{channel.name}")


def promote_channel(session: Session, actor: Actor, channel: Channel, evaluation_id: int
                    ) -> Channel:
    """Point the channel at an evaluation of its jobset (Hydra: the latest good one)."""
    require_permission(session, actor, Action.jobset_manage, channel.project_id)
    evaluation = session.get(Evaluation, evaluation_id)
    if evaluation is None:
        raise NotFound(f"no evaluation with id {evaluation_id}")
    if evaluation.jobset_id != channel.jobset_id:
        raise InvalidInput("the evaluation belongs to another jobset",
                           {"evaluation_id": [f"not an evaluation of jobset {channel.jobset_id}"]})
    channel.evaluation_id = evaluation.id
    channel.moved_at = datetime.now(UTC)
    audit.record(session, actor, "channel.promote", f"channel:{channel.name}",
                 {"evaluation_id": evaluation.id})
    return channel


# ---------------------------------------------------------------------------
# members


def set_member(session: Session, actor: Actor, project: Project, *, role: MemberRole,
               user_id: int | None = None, username: str | None = None,
               managed: bool | None = None) -> ProjectMember:
    """Add a member or change their role (and, declaratively, adopt the membership)."""
    require_permission(session, actor, Action.member_manage, project.id)
    user = _user(session, user_id, username)
    member = session.get(ProjectMember, (project.id, user.id))
    if member is None:
        member = ProjectMember(project_id=project.id, user_id=user.id, role=role,
                               managed_declaratively=bool(managed))
        insert_unique(session, member, "already a member")
    elif not apply_changes(member, {"role": role}, ("role",)) | apply_managed(member, managed):
        return member  # nothing changed: no audit row
    audit.record(session, actor, "member.set", f"project:{project.name}/user:{user.username}",
                 {"role": role.value})
    return member


def remove_member(session: Session, actor: Actor, project: Project, user_id: int) -> None:
    require_permission(session, actor, Action.member_manage, project.id)
    member = session.get(ProjectMember, (project.id, user_id))
    if member is None:
        raise NotFound(f"user {user_id} is not a member of {project.name}")
    session.delete(member)
    audit.record(session, actor, "member.remove", f"project:{project.name}/user:{user_id}")
