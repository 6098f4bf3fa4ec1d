"""Administration: users, SSH builders, notification tasks, the audit log, configuration."""

from __future__ import annotations

import json
import re
from pathlib import Path

from flask import flash, redirect, render_template, request, url_for
from flask.typing import ResponseReturnValue
from sqlalchemy import func, select

from circus import __version__
from circus.auth import service as users
from circus.common.enums import NotificationTaskStatus, Role
from circus.common.errors import CircusError
from circus.common.heartbeat import freshness
from circus.common.models import (
    AuditLog,
    NotificationTask,
    RemoteBuilder,
    User,
)
from circus.machines import service as machines
from circus.notifications import service as notifications
from circus.server import configfile
from circus.server.api.queries import system_counts
from circus.server.auth import current_actor
from circus.server.context import db_session, settings
from circus.server.dashboard.access import page
from circus.server.dashboard.blueprint import blueprint
from circus.server.dashboard.forms import Form, query_text, split_list
from circus.server.dashboard.pagination import paginate

#: system_counts keys shown on the admin page, with their labels
ADMIN_TILES = (("projects", "projects"), ("jobsets", "jobsets"), ("evaluations", "evaluations"),
               ("builds", "builds"), ("users", "users"), ("remote_builders", "SSH builders"),
               ("steps_active", "active steps"), ("agents_connected", "connected agents"))
BUILDER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@:-]{0,127}$")


@blueprint.get("/admin")
@page("admin")
def admin() -> ResponseReturnValue:
    session = db_session()
    found = system_counts(session)
    counts = {label: found[key] for key, label in ADMIN_TILES}
    failed_tasks = int(session.scalar(select(func.count()).select_from(NotificationTask).where(
        NotificationTask.status == NotificationTaskStatus.failed)) or 0)
    return render_template("admin/index.html", counts=counts, daemons=freshness(session),
                           failed_tasks=failed_tasks, version=__version__)


# ---------------------------------------------------------------------------
# users


USER_FIELDS = ("username", "password", "email", "full_name", "role")


@blueprint.get("/admin/users")
@page("admin")
def admin_users() -> ResponseReturnValue:
    return _users_page(Form({"role": Role.read_only.value}))


def _users_page(form: Form) -> ResponseReturnValue:
    session = db_session()
    query = select(User).order_by(User.username)
    q = query_text("q", 128)
    if q:
        query = query.where(User.username.icontains(q, autoescape=True))
    return render_template("admin/users.html", users=paginate(session, query, 50), q=q,
                           roles=list(Role), form=form), form.status


@blueprint.post("/admin/users")
@page("admin")
def admin_create_user() -> ResponseReturnValue:
    form = Form.posted(*USER_FIELDS)
    form.require("username")
    if form.get("role") not in {r.value for r in Role}:
        form.add("role", "unknown role")
    if form.ok:
        session = db_session()
        try:
            user = users.create_user(
                session, current_actor(), username=form.get("username"),
                password=form.get("password") or None, email=form.get("email") or None,
                full_name=form.get("full_name") or None, role=Role(form.get("role")))
            session.commit()
        except CircusError as exc:
            session.rollback()
            form.fail(exc)
        else:
            flash(f"User {user.username} created.", "ok")
            return redirect(url_for("dashboard.admin_users"))
    form.values.pop("password", None)
    return _users_page(form)


@blueprint.post("/admin/users/<id:user_id>")
@page("admin")
def admin_update_user(user_id: int) -> ResponseReturnValue:
    session = db_session()
    changes: dict[str, object] = {}
    role = request.form.get("role")
    if role is not None:
        if role not in {r.value for r in Role}:
            flash("Unknown role.", "error")
            return redirect(url_for("dashboard.admin_users"))
        changes["role"] = Role(role)
    enabled = request.form.get("enabled")
    if enabled in ("true", "false"):
        changes["enabled"] = enabled == "true"
    user = users.update_user(session, current_actor(), user_id, changes)
    session.commit()
    flash(f"User {user.username} updated.", "ok")
    return redirect(url_for("dashboard.admin_users"))


# ---------------------------------------------------------------------------
# SSH builders


BUILDER_FIELDS = ("name", "ssh_uri", "systems", "max_jobs", "speed_factor",
                  "supported_features", "mandatory_features")


@blueprint.get("/admin/builders")
@page("admin")
def admin_builders() -> ResponseReturnValue:
    return _builders_page(Form({"systems": "x86_64-linux", "max_jobs": "1",
                                "speed_factor": "1"}))


def _builders_page(form: Form) -> ResponseReturnValue:
    builders = list(db_session().scalars(select(RemoteBuilder).order_by(RemoteBuilder.name)))
    return render_template("admin/builders.html", builders=builders, form=form), form.status


@blueprint.post("/admin/builders")
@page("admin")
def admin_create_builder() -> ResponseReturnValue:
    form = Form.posted(*BUILDER_FIELDS)
    form.require("name", "ssh_uri", "systems")
    if form.get("name") and not BUILDER_NAME.match(form.get("name")):
        form.add("name", "letters, digits and . _ @ : - only, at most 128")
    max_jobs = form.integer("max_jobs", minimum=1)
    speed = form.number("speed_factor", minimum=0.001)
    if form.ok:
        session = db_session()
        try:
            builder = machines.create_builder(
                session, current_actor(), name=form.get("name"), ssh_uri=form.get("ssh_uri"),
                systems=split_list(form.get("systems")), max_jobs=max_jobs or 1,
                speed_factor=speed or 1.0,
                supported_features=split_list(form.get("supported_features")),
                mandatory_features=split_list(form.get("mandatory_features")))
            session.commit()
        except CircusError as exc:
            session.rollback()
            form.fail(exc)
        else:
            flash(f"Builder {builder.name} added.", "ok")
            return redirect(url_for("dashboard.admin_builders"))
    return _builders_page(form)


@blueprint.post("/admin/builders/<id:builder_id>/<any(enable,disable,delete):action>")
@page("admin")
def admin_builder_action(builder_id: int, action: str) -> ResponseReturnValue:
    session = db_session()
    builder = machines.get_builder(session, builder_id)
    name = builder.name
    if action == "delete":
        machines.delete_builder(session, current_actor(), builder)
    else:
        machines.update_builder(session, current_actor(), builder,
                                {"enabled": action == "enable"})
    session.commit()
    flash(f"Builder {name} {action}d.", "ok")
    return redirect(url_for("dashboard.admin_builders"))


# ---------------------------------------------------------------------------
# notification tasks


@blueprint.get("/admin/notifications")
@page("admin")
def admin_notifications() -> ResponseReturnValue:
    query = select(NotificationTask).order_by(NotificationTask.id.desc())
    status = request.args.get("status", "")
    if status in NotificationTaskStatus.__members__:
        query = query.where(NotificationTask.status == NotificationTaskStatus(status))
    else:
        status = ""
    return render_template("admin/notifications.html",
                           tasks=paginate(db_session(), query, 50), status=status,
                           statuses=list(NotificationTaskStatus))


@blueprint.post("/admin/notifications/<id:task_id>/retry")
@page("admin")
def admin_retry_notification(task_id: int) -> ResponseReturnValue:
    session = db_session()
    notifications.retry(session, current_actor(), task_id)
    session.commit()
    flash(f"Notification task {task_id} will be retried.", "ok")
    return redirect(url_for("dashboard.admin_notifications",
                            status=request.args.get("status") or None))


# ---------------------------------------------------------------------------
# audit log


@blueprint.get("/admin/audit")
@page("admin")
def admin_audit() -> ResponseReturnValue:
    query = select(AuditLog).order_by(AuditLog.id.desc())
    filters = {name: query_text(name) for name in ("action", "actor", "target")}
    for name, value in filters.items():
        if value:
            query = query.where(getattr(AuditLog, name) == value)
    return render_template("admin/audit.html", entries=paginate(db_session(), query, 50),
                           filters=filters, json=json)


# ---------------------------------------------------------------------------
# configuration


@blueprint.get("/admin/config")
@page("admin")
def admin_config() -> ResponseReturnValue:
    return _config_page(Form({"toml": _config_text()}))


def _config_text() -> str:
    """The file as written (secrets included): only offered when the editor is on."""
    path = configfile.config_file()
    if not path or not settings().server.config_editor_enabled:
        return ""
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _config_page(form: Form) -> ResponseReturnValue:
    config = settings()
    return render_template(
        "admin/config.html", config=json.dumps(configfile.redact(config), indent=2),
        editable=config.server.config_editor_enabled and bool(configfile.config_file()),
        config_file=configfile.config_file(), form=form), form.status


@blueprint.post("/admin/config")
@page("admin")
def admin_update_config() -> ResponseReturnValue:
    form = Form({"toml": request.form.get("toml", "")})
    session = db_session()
    try:
        configfile.replace(session, current_actor(), settings(), form.get("toml"))
        session.commit()
    except CircusError as exc:
        session.rollback()
        form.fail(exc)
        return _config_page(form)
    flash("Configuration written and its declarative part applied; other settings take "
          "effect when the daemons restart.", "ok")
    return redirect(url_for("dashboard.admin_config"))
