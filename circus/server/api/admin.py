"""/api/v1/admin: builders, agent sessions, notification tasks, audit log, system, config."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from flask.typing import ResponseReturnValue
from pydantic import BaseModel
from sqlalchemy import func, select, text

from circus import __version__, audit
from circus.auth.permissions import Action, require_permission
from circus.common.config import ConfigError, Settings, load_settings
from circus.common.configbase import SettingsModel, validate_sections
from circus.common.errors import Conflict, InvalidInput, NotFound
from circus.common.heartbeat import freshness
from circus.common.models import (
    AuditLog,
    Build,
    BuilderSession,
    Evaluation,
    Jobset,
    NotificationTask,
    Project,
    RemoteBuilder,
    Step,
    User,
)
from circus.machines import service as machines
from circus.notifications import service as notifications
from circus.server.api.base import Blueprint, paginate
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

REDACTED = "<redacted>"


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
    counts = {}
    for name, model in (("projects", Project), ("jobsets", Jobset), ("evaluations", Evaluation),
                        ("builds", Build), ("users", User), ("remote_builders", RemoteBuilder)):
        counts[name] = int(session.scalar(select(func.count()).select_from(model)) or 0)
    counts["builds_pending"] = int(session.scalar(
        select(func.count()).select_from(Build).where(Build.status == 0)) or 0)
    counts["steps_active"] = int(session.scalar(
        select(func.count()).select_from(Step).where(Step.state != "done")) or 0)
    counts["agents_connected"] = int(session.scalar(
        select(func.count()).select_from(BuilderSession).where(
            BuilderSession.connected.is_(True))) or 0)
    version = session.scalar(text("SHOW server_version"))
    config = settings()
    return {"version": __version__, "database": {"ok": True, "server_version": version},
            "counts": counts, "daemons": freshness(session),
            "settings": {"require_api_key_for_reads": config.server.require_api_key_for_reads,
                         "config_editor_enabled": config.server.config_editor_enabled,
                         "cache_enabled": config.cache.enabled,
                         "signing_enabled": config.signing.enabled,
                         "gateway": config.queue_runner.rpc.bind}}


def redact(model: BaseModel) -> dict[str, Any]:
    """The settings as JSON with every secret (and database URL) replaced."""
    out: dict[str, Any] = {}
    secret = model.secret_fields if isinstance(model, SettingsModel) else ()
    for name in type(model).model_fields:
        value = getattr(model, name)
        if name in secret and value:
            out[name] = REDACTED if not isinstance(value, list) else [REDACTED] * len(value)
        else:
            out[name] = _redact_value(value)
    return out


def _redact_value(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return redact(value)
    if isinstance(value, list):
        return [_redact_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _redact_value(v) for k, v in value.items()}
    if hasattr(value, "value") and not isinstance(value, bool | int | float | str):
        return value.value
    return value


def _config_file() -> str | None:
    return os.environ.get("CIRCUS_CONFIG_FILE")


@blp.get("/config")
@blp.response(200, ConfigSchema)
def get_config() -> Any:
    _admin()
    return {"config": redact(settings()), "editable": settings().server.config_editor_enabled,
            "config_file": _config_file()}


@blp.put("/config")
@blp.arguments(ConfigUpdateSchema)
@blp.response(200, ConfigUpdateResultSchema)
def put_config(data: dict[str, Any]) -> Any:
    """Replace the configuration file (validated first) and apply its declarative part.

    Only when ``server.config_editor_enabled``; other settings take effect on restart.
    """
    _admin()
    if not settings().server.config_editor_enabled:
        raise Conflict("the configuration editor is disabled",
                       {"hint": "set server.config_editor_enabled = true"})
    path = _config_file()
    if not path:
        raise Conflict("the server was started without CIRCUS_CONFIG_FILE; nothing to write")
    try:
        raw = tomllib.loads(data["toml"])
        validate_sections(Settings, raw)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidInput("not valid TOML", {"toml": [str(exc)]}) from exc
    except ConfigError as exc:
        raise InvalidInput("invalid configuration",
                           {"toml": [str(p) for p in exc.problems]}) from exc
    target = Path(path)
    temporary = target.with_name(target.name + ".new")
    temporary.write_text(data["toml"])
    temporary.replace(target)
    from circus.declarative import apply_declarative

    session = db_session()
    summary = apply_declarative(session, load_settings(files=[target]),
                                actor=current_actor())
    audit.record(session, current_actor(), "config.update", f"file:{target}")
    session.commit()
    return {"written": str(target), "declarative": summary, "restart_required": True}
