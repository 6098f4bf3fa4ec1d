"""/api/v1/admin: builders, agent sessions, notification tasks, audit log, system, config."""

from __future__ import annotations

from typing import Any

from flask.typing import ResponseReturnValue
from sqlalchemy import select, text

from circus import __version__
from circus.auth.permissions import Action, require_permission
from circus.common.errors import NotFound
from circus.common.heartbeat import freshness
from circus.common.models import (
    AuditLog,
    BuilderSession,
    NotificationTask,
    RemoteBuilder,
)
from circus.machines import service as machines
from circus.notifications import service as notifications
from circus.server import configfile
from circus.server.api.base import Blueprint, paginate
from circus.server.api.queries import system_counts
from circus.server.api.schemas.admin import (
    AuditFilterSchema,
    AuditLogSchema,
    BuilderCreateSchema,
    BuilderSchema,
    BuilderSessionSchema,
    BuilderUpdateSchema,
    ConfigSchema,
    ConfigUpdateResultSchema,
    ConfigUpdateSchema,
    NotificationTaskFilterSchema,
    NotificationTaskSchema,
    SessionFilterSchema,
    SystemSchema,
)
from circus.server.api.schemas.common import PageArgs, page_of
from circus.server.auth import current_actor
from circus.server.context import db_session, settings

blp = Blueprint("admin", __name__, url_prefix="/api/v1/admin",
                description="Administration (admin role)")

def _admin(action: Action = Action.admin_access) -> None:
    require_permission(db_session(), current_actor(), action)


# ---------------------------------------------------------------------------
# SSH builders and agent sessions


@blp.get("/builders")
@blp.arguments(PageArgs, location="query")
@blp.response(200, page_of(BuilderSchema))
def list_builders(args: dict[str, Any]) -> Any:
    _admin()
    return paginate(db_session(), select(RemoteBuilder).order_by(RemoteBuilder.name), args)


@blp.post("/builders")
@blp.arguments(BuilderCreateSchema)
@blp.response(201, BuilderSchema)
def create_builder(data: dict[str, Any]) -> Any:
    session = db_session()
    row = machines.create_builder(session, current_actor(), **data)
    session.commit()
    return row


@blp.get("/builders/<id:builder_id>")
@blp.response(200, BuilderSchema)
def get_builder(builder_id: int) -> Any:
    _admin()
    return machines.get_builder(db_session(), builder_id)


@blp.put("/builders/<id:builder_id>")
@blp.arguments(BuilderUpdateSchema)
@blp.response(200, BuilderSchema)
def update_builder(data: dict[str, Any], builder_id: int) -> Any:
    session = db_session()
    row = machines.update_builder(session, current_actor(),
                                  machines.get_builder(session, builder_id), data)
    session.commit()
    return row


@blp.delete("/builders/<id:builder_id>")
@blp.response(204)
def delete_builder(builder_id: int) -> ResponseReturnValue:
    session = db_session()
    machines.delete_builder(session, current_actor(), machines.get_builder(session, builder_id))
    session.commit()
    return ""


@blp.get("/builders/sessions")
@blp.arguments(SessionFilterSchema, location="query")
@blp.response(200, page_of(BuilderSessionSchema))
def list_sessions(args: dict[str, Any]) -> Any:
    """Agents (``circus-agent``) that connected to the gateway, newest first."""
    _admin()
    query = select(BuilderSession).order_by(BuilderSession.connected.desc(),
                                            BuilderSession.last_seen.desc().nulls_last())
    if "connected" in args:
        query = query.where(BuilderSession.connected.is_(args["connected"]))
    return paginate(db_session(), query, args)


@blp.get("/builders/sessions/connected")
@blp.arguments(PageArgs, location="query")
@blp.response(200, page_of(BuilderSessionSchema))
def connected_sessions(args: dict[str, Any]) -> Any:
    _admin()
    query = select(BuilderSession).where(BuilderSession.connected.is_(True)).order_by(
        BuilderSession.name)
    return paginate(db_session(), query, args)


@blp.get("/builders/sessions/<string:machine_id>")
@blp.response(200, BuilderSessionSchema)
def get_session(machine_id: str) -> Any:
    _admin()
    if "\x00" in machine_id:
        raise NotFound("no such agent")
    row = db_session().scalar(
        select(BuilderSession).where(BuilderSession.machine_id == machine_id)
        .order_by(BuilderSession.connected.desc(), BuilderSession.id.desc()).limit(1))
    if row is None:
        raise NotFound(f"no agent session for machine {machine_id}")
    return row


# ---------------------------------------------------------------------------
# notification tasks and audit log


@blp.get("/notification-tasks")
@blp.arguments(NotificationTaskFilterSchema, location="query")
@blp.response(200, page_of(NotificationTaskSchema))
def notification_tasks(args: dict[str, Any]) -> Any:
    _admin()
    query = select(NotificationTask).order_by(NotificationTask.id.desc())
    if "status" in args:
        query = query.where(NotificationTask.status == args["status"])
    if "type" in args:
        query = query.where(NotificationTask.type == args["type"])
    return paginate(db_session(), query, args)


@blp.post("/notification-tasks/<id:task_id>/retry")
@blp.response(200, NotificationTaskSchema)
def retry_notification(task_id: int) -> Any:
    """Put a failed (or stuck) task back to pending with a fresh attempt budget; it is
    delivered right away."""
    _admin()
    session = db_session()
    task = notifications.retry(session, current_actor(), task_id)
    session.commit()
    return task


@blp.get("/audit-log")
@blp.arguments(AuditFilterSchema, location="query")
@blp.response(200, page_of(AuditLogSchema))
def audit_log(args: dict[str, Any]) -> Any:
    _admin()
    query = select(AuditLog).order_by(AuditLog.id.desc())
    if "action" in args:
        query = query.where(AuditLog.action == args["action"])
    if "actor" in args:
        query = query.where(AuditLog.actor == args["actor"])
    if "target" in args:
        query = query.where(AuditLog.target == args["target"])
    return paginate(db_session(), query, args)


# ---------------------------------------------------------------------------
# system and configuration


@blp.get("/system")
@blp.response(200, SystemSchema)
def system() -> Any:
    _admin()
    session = db_session()
    counts = system_counts(session)
    version = session.scalar(text("SHOW server_version"))
    config = settings()
    return {"version": __version__, "database": {"ok": True, "server_version": version},
            "counts": counts, "daemons": freshness(session),
            "settings": {"require_api_key_for_reads": config.server.require_api_key_for_reads,
                         "config_editor_enabled": config.server.config_editor_enabled,
                         "cache_enabled": config.cache.enabled,
                         "signing_enabled": config.signing.enabled,
                         "gateway": config.queue_runner.rpc.bind}}


@blp.get("/config")
@blp.response(200, ConfigSchema)
def get_config() -> Any:
    _admin()
    return {"config": configfile.redact(settings()),
            "editable": settings().server.config_editor_enabled,
            "config_file": configfile.config_file()}


@blp.put("/config")
@blp.arguments(ConfigUpdateSchema)
@blp.response(200, ConfigUpdateResultSchema)
def put_config(data: dict[str, Any]) -> Any:
    """Replace the configuration file (validated first) and apply its declarative part.

    Only when ``server.config_editor_enabled``; other settings take effect on restart.
    """
    session = db_session()
    result = configfile.replace(session, current_actor(), settings(), data["toml"])
    session.commit()
    return result
