"""/api/v1/projects: projects, jobsets, inputs, webhooks, notifications, channels, members."""

from __future__ import annotations

from typing import Any

from flask import jsonify, request
from flask.typing import ResponseReturnValue
from sqlalchemy import select
from sqlalchemy.orm import Session

from circus.auth.visibility import only_visible, require_visible
from circus.common.models import (
    Build,
    Channel,
    Jobset,
    JobsetInput,
    NotificationConfig,
    Project,
    ProjectMember,
    User,
    WebhookConfig,
)
from circus.projects import service
from circus.server.api.base import Blueprint, paginate
from circus.server.api.listrows import build_dicts, select_builds
from circus.server.api.queries import build_id_at_offset, build_total, filter_builds
from circus.server.api.schemas.builds import BuildFilterSchema, BuildSchema
from circus.server.api.schemas.common import PageArgs, page_of
from circus.server.api.schemas.projects import (
    ChannelSchema,
    InputCreateSchema,
    InputSchema,
    JobsetCreateSchema,
    JobsetSchema,
    JobsetUpdateSchema,
    MemberCreateSchema,
    MemberSchema,
    NotificationConfigCreateSchema,
    NotificationConfigSchema,
    ProjectCreateSchema,
    ProjectFilterSchema,
    ProjectSchema,
    ProjectUpdateSchema,
    WebhookCreateSchema,
    WebhookSchema,
)
from circus.server.auth import current_actor
from circus.server.context import db_session, settings

blp = Blueprint("projects", __name__, url_prefix="/api/v1/projects",
                description="Projects and their jobsets, inputs, hooks, channels and members")

P = "/<name:project>"
J = P + "/jobsets/<name:jobset>"


def _project(session: Session, ref: str) -> Project:
    """The project named ``ref``, a 404 when it is hidden from the caller."""
    row = service.get_project(session, ref)
    require_visible(session, current_actor(), row.id, f"project {ref}")
    return row


def _schemes() -> list[str]:
    return settings().server.allowed_url_schemes


def _allowed_paths() -> list[str]:
    return settings().evaluator.allowed_path_inputs


# ---------------------------------------------------------------------------
# projects


@blp.get("")
@blp.arguments(ProjectFilterSchema, location="query")
@blp.response(200, page_of(ProjectSchema))
def list_projects(args: dict[str, Any]) -> Any:
    query = only_visible(select(Project), Project.id, current_actor()).order_by(Project.name)
    if "q" in args:
        query = query.where(Project.name.icontains(args["q"], autoescape=True))
    if "enabled" in args:
        query = query.where(Project.enabled.is_(args["enabled"]))
    return paginate(db_session(), query, args)


@blp.post("")
@blp.arguments(ProjectCreateSchema)
@blp.response(201, ProjectSchema)
def create_project(data: dict[str, Any]) -> Any:
    session = db_session()
    project = service.create_project(session, current_actor(), allowed_schemes=_schemes(),
                                     allowed_paths=_allowed_paths(), **data)
    session.commit()
    return project


@blp.get(P)
@blp.response(200, ProjectSchema)
def get_project(project: str) -> Any:
    return _project(db_session(), project)


@blp.put(P)
@blp.arguments(ProjectUpdateSchema)
@blp.response(200, ProjectSchema)
def update_project(data: dict[str, Any], project: str) -> Any:
    session = db_session()
    row = service.update_project(session, current_actor(), _project(session, project),
                                 data, allowed_schemes=_schemes(),
                                 allowed_paths=_allowed_paths())
    session.commit()
    return row


@blp.delete(P)
@blp.response(204)
def delete_project(project: str) -> ResponseReturnValue:
    session = db_session()
    service.delete_project(session, current_actor(), _project(session, project))
    session.commit()
    return ""


@blp.get(P + "/builds")
@blp.arguments(BuildFilterSchema, location="query")
@blp.response(200, page_of(BuildSchema))
def project_builds(args: dict[str, Any], project: str) -> Any:
    session = db_session()
    row = _project(session, project)
    actor = current_actor()
    filters = {**args, "project_id": row.id}
    query = filter_builds(select_builds(), filters, actor).order_by(Build.id.desc())
    page = paginate(session, query, args, scalars=False, cursor_column=Build.id,
                    total=build_total(session, filters, actor),
                    id_at_offset=build_id_at_offset(session, filters, actor))
    return jsonify({**page, "items": build_dicts(session, page["items"])})


# ---------------------------------------------------------------------------
# jobsets and inputs


@blp.get(P + "/jobsets")
@blp.arguments(PageArgs, location="query")
@blp.response(200, page_of(JobsetSchema))
def list_jobsets(args: dict[str, Any], project: str) -> Any:
    session = db_session()
    row = _project(session, project)
    query = select(Jobset).where(Jobset.project_id == row.id).order_by(Jobset.name)
    return paginate(session, query, args)


@blp.post(P + "/jobsets")
@blp.arguments(JobsetCreateSchema)
@blp.response(201, JobsetSchema)
def create_jobset(data: dict[str, Any], project: str) -> Any:
    session = db_session()
    row = _project(session, project)
    jobset = service.create_jobset(session, current_actor(), row, **data)
    session.commit()
    return jobset


@blp.get(J)
@blp.response(200, JobsetSchema)
def get_jobset(project: str, jobset: str) -> Any:
    session = db_session()
    return service.get_jobset(session, _project(session, project), jobset)


@blp.put(J)
@blp.arguments(JobsetUpdateSchema)
@blp.response(200, JobsetSchema)
def update_jobset(data: dict[str, Any], project: str, jobset: str) -> Any:
    session = db_session()
    row = service.get_jobset(session, _project(session, project), jobset)
    row = service.update_jobset(session, current_actor(), row, data)
    session.commit()
    return row


@blp.delete(J)
@blp.response(204)
def delete_jobset(project: str, jobset: str) -> ResponseReturnValue:
    session = db_session()
    row = service.get_jobset(session, _project(session, project), jobset)
    service.delete_jobset(session, current_actor(), row)
    session.commit()
    return ""


@blp.get(J + "/inputs")
@blp.arguments(PageArgs, location="query")
@blp.response(200, page_of(InputSchema))
def list_inputs(args: dict[str, Any], project: str, jobset: str) -> Any:
    session = db_session()
    row = service.get_jobset(session, _project(session, project), jobset)
    query = select(JobsetInput).where(JobsetInput.jobset_id == row.id).order_by(JobsetInput.name)
    return paginate(session, query, args)


@blp.post(J + "/inputs")
@blp.arguments(InputCreateSchema)
@blp.response(201, InputSchema)
def create_input(data: dict[str, Any], project: str, jobset: str) -> Any:
    session = db_session()
    row = service.get_jobset(session, _project(session, project), jobset)
    created = service.add_input(session, current_actor(), row,
                                allowed_paths=_allowed_paths(), **data)
    session.commit()
    return created


@blp.get(J + "/inputs/<name:input_name>")
@blp.response(200, InputSchema)
def get_input(project: str, jobset: str, input_name: str) -> Any:
    session = db_session()
    row = service.get_jobset(session, _project(session, project), jobset)
    return service.get_input(session, row, input_name)


@blp.delete(J + "/inputs/<name:input_name>")
@blp.response(204)
def delete_input(project: str, jobset: str, input_name: str) -> ResponseReturnValue:
    session = db_session()
    row = service.get_jobset(session, _project(session, project), jobset)
    service.delete_input(session, current_actor(), row, input_name)
    session.commit()
    return ""


# ---------------------------------------------------------------------------
# webhooks and notifications


def _with_url(hook: WebhookConfig, project: Project) -> WebhookConfig:
    base = settings().server.base_url or request.host_url
    hook.url = (f"{base.rstrip('/')}/api/v1/webhooks/{project.name}/"  # type: ignore[attr-defined]
                f"{hook.forge_type.value}")
    return hook


@blp.get(P + "/webhooks")
@blp.arguments(PageArgs, location="query")
@blp.response(200, page_of(WebhookSchema))
def list_webhooks(args: dict[str, Any], project: str) -> Any:
    session = db_session()
    row = _project(session, project)
    _require_hooks_reader(row)
    query = select(WebhookConfig).where(WebhookConfig.project_id == row.id).order_by(
        WebhookConfig.id)
    page = paginate(session, query, args)
    page["items"] = [_with_url(hook, row) for hook in page["items"]]
    return page


@blp.post(P + "/webhooks")
@blp.arguments(WebhookCreateSchema)
@blp.response(201, WebhookSchema)
def create_webhook(data: dict[str, Any], project: str) -> Any:
    session = db_session()
    row = _project(session, project)
    hook = service.create_webhook(session, current_actor(), row,
                                  server_key=settings().server.secret_key or "", **data)
    session.commit()
    return _with_url(hook, row)


@blp.delete(P + "/webhooks/<id:webhook_id>")
@blp.response(204)
def delete_webhook(project: str, webhook_id: int) -> ResponseReturnValue:
    session = db_session()
    service.delete_webhook(session, current_actor(), _project(session, project),
                           webhook_id)
    session.commit()
    return ""


@blp.get(P + "/notifications")
@blp.arguments(PageArgs, location="query")
@blp.response(200, page_of(NotificationConfigSchema))
def list_notifications(args: dict[str, Any], project: str) -> Any:
    session = db_session()
    row = _project(session, project)
    # notification configs hold tokens and addresses: maintainers only
    _require_hooks_reader(row)
    query = select(NotificationConfig).where(NotificationConfig.project_id == row.id).order_by(
        NotificationConfig.id)
    return paginate(session, query, args)


@blp.post(P + "/notifications")
@blp.arguments(NotificationConfigCreateSchema)
@blp.response(201, NotificationConfigSchema)
def create_notification(data: dict[str, Any], project: str) -> Any:
    session = db_session()
    row = service.create_notification(session, current_actor(),
                                      _project(session, project), **data)
    session.commit()
    return row


@blp.delete(P + "/notifications/<id:config_id>")
@blp.response(204)
def delete_notification(project: str, config_id: int) -> ResponseReturnValue:
    session = db_session()
    service.delete_notification(session, current_actor(), _project(session, project),
                                config_id)
    session.commit()
    return ""


def _require_hooks_reader(project: Project) -> None:
    from circus.auth.permissions import Action, require_permission

    require_permission(db_session(), current_actor(), Action.hooks_manage, project.id)


# ---------------------------------------------------------------------------
# channels and members


@blp.get(P + "/channels")
@blp.arguments(PageArgs, location="query")
@blp.response(200, page_of(ChannelSchema))
def list_project_channels(args: dict[str, Any], project: str) -> Any:
    session = db_session()
    row = _project(session, project)
    query = select(Channel).where(Channel.project_id == row.id).order_by(Channel.name)
    return paginate(session, query, args)


@blp.get(P + "/members")
@blp.arguments(PageArgs, location="query")
@blp.response(200, page_of(MemberSchema))
def list_members(args: dict[str, Any], project: str) -> Any:
    session = db_session()
    row = _project(session, project)
    query = (select(ProjectMember, User.username).join(User, User.id == ProjectMember.user_id)
             .where(ProjectMember.project_id == row.id).order_by(User.username))
    page = paginate(session, query, args, scalars=False)
    page["items"] = [_member(m, name) for m, name in page["items"]]
    return page


def _member(member: ProjectMember, username: str) -> dict[str, Any]:
    return {"project_id": member.project_id, "user_id": member.user_id, "username": username,
            "role": member.role, "managed_declaratively": member.managed_declaratively,
            "created_at": member.created_at}


@blp.post(P + "/members")
@blp.arguments(MemberCreateSchema)
@blp.response(201, MemberSchema)
def add_member(data: dict[str, Any], project: str) -> Any:
    session = db_session()
    member = service.set_member(session, current_actor(), _project(session, project),
                                **data)
    session.commit()
    user = session.get(User, member.user_id)
    return _member(member, user.username if user else "")


@blp.delete(P + "/members/<id:user_id>")
@blp.response(204)
def remove_member(project: str, user_id: int) -> ResponseReturnValue:
    session = db_session()
    service.remove_member(session, current_actor(), _project(session, project),
                          user_id)
    session.commit()
    return ""
