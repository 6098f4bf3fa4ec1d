"""Logging in and out, and the user's own settings: profile, password, API keys."""

from __future__ import annotations

from flask import flash, redirect, render_template, request, url_for
from flask.typing import ResponseReturnValue
from sqlalchemy import select

from circus import audit
from circus.auth import service
from circus.common.enums import ActorKind, Role
from circus.common.errors import CircusError, InvalidInput, PermissionDenied
from circus.common.models import ApiKey
from circus.server.auth import current_actor, log_out, password_login
from circus.server.context import db_session, settings
from circus.server.dashboard.access import page, safe_next
from circus.server.dashboard.blueprint import blueprint
from circus.server.dashboard.forms import Form

# ---------------------------------------------------------------------------
# login


@blueprint.get("/login")
@page("login")
def login() -> ResponseReturnValue:
    target = safe_next(request.args.get("next"))
    if current_actor().is_authenticated:
        return redirect(target)
    return _login_page(Form({"username": "", "next": target}))


def _login_page(form: Form) -> ResponseReturnValue:
    config = settings()
    return render_template("login.html", form=form, ldap=config.server.ldap.enabled,
                           github=config.oauth.github.enabled), form.status


@blueprint.post("/login")
@page("login")
def login_submit() -> ResponseReturnValue:
    form = Form.posted("username", "password", "next")
    form.values["next"] = safe_next(form.get("next"))
    form.require("username", "password")
    if len(form.get("username")) > 128 or len(form.get("password")) > 4096:
        form.add("username", "too long")
    if form.ok:
        user = password_login(form.get("username"), form.get("password"))
        if user is not None:
            flash(f"Logged in as {user.username}.", "ok")
            return redirect(form.get("next"))
        form.message = "Invalid username or password."
        form.status = 401
    return _login_page(form)


@blueprint.post("/logout")
def logout() -> ResponseReturnValue:
    actor = current_actor()
    if actor.kind is ActorKind.user:
        audit.record(db_session(), actor, "auth.logout", f"user:{actor.name}")
    log_out()
    db_session().commit()
    flash("Logged out.", "ok")
    return redirect(url_for("dashboard.home"))


# ---------------------------------------------------------------------------
# settings


def _settings_page(*, profile: Form | None = None, password: Form | None = None,
                   key: Form | None = None, created: tuple[ApiKey, str] | None = None
                   ) -> ResponseReturnValue:
    session = db_session()
    actor = current_actor()
    user = service.current_user_row(session, actor)
    keys = list(session.scalars(select(ApiKey).where(ApiKey.owner_id == user.id)
                                .order_by(ApiKey.revoked_at.is_not(None), ApiKey.id.desc())))
    roles = [Role.read_only] if actor.role in (None, Role.read_only) else [
        actor.role, Role.read_only]
    if actor.is_admin:
        roles = list(Role)
    forms = [f for f in (profile, password, key) if f is not None]
    status = max((f.status for f in forms), default=200)
    html = render_template(
        "settings.html", user=user, keys=keys, roles=roles, created=created,
        profile=profile or Form({"email": user.email or "", "full_name": user.full_name or ""}),
        password=password or Form(), key=key or Form({"role": Role.read_only.value}))
    # a new key's secret is on this page: never keep it in a cache
    return html, status, {"Cache-Control": "no-store"}


@blueprint.get("/settings")
@page("settings")
def user_settings() -> ResponseReturnValue:
    return _settings_page()


@blueprint.post("/settings/profile")
@page("settings")
def update_profile() -> ResponseReturnValue:
    form = Form.posted("email", "full_name")
    if form.get("email") and "@" not in form.get("email"):
        form.add("email", "not an email address")
    for name in ("email", "full_name"):
        if len(form.get(name)) > 256:
            form.add(name, "at most 256 characters")
    if form.ok:
        session = db_session()
        service.update_me(session, current_actor(), {
            "email": form.get("email") or None, "full_name": form.get("full_name") or None})
        session.commit()
        flash("Profile saved.", "ok")
        return redirect(url_for("dashboard.user_settings"))
    return _settings_page(profile=form)


@blueprint.post("/settings/password")
@page("settings")
def change_password() -> ResponseReturnValue:
    form = Form.posted("current_password", "new_password", "new_password2")
    form.require("new_password")
    if form.get("new_password") != form.get("new_password2"):
        form.add("new_password2", "does not match the new password")
    if form.ok:
        session = db_session()
        try:
            service.change_password(session, current_actor(), form.get("current_password"),
                                    form.get("new_password"))
            session.commit()
        except (InvalidInput, PermissionDenied) as exc:
            session.rollback()
            if "password" in (exc.details or {}):
                exc.details = {"new_password": exc.details["password"]}
            form.fail(exc)
        else:
            # changing the password ends every session, this one included
            log_out()
            flash("Password changed. Log in with the new password.", "ok")
            return redirect(url_for("dashboard.login", next=url_for("dashboard.user_settings")))
    form.values = {}
    return _settings_page(password=form)


@blueprint.post("/settings/api-keys")
@page("settings")
def create_api_key() -> ResponseReturnValue:
    form = Form.posted("name", "role")
    form.require("name")
    if form.get("role") not in {r.value for r in Role}:
        form.add("role", "unknown role")
    if form.ok:
        session = db_session()
        actor = current_actor()
        try:
            key, secret = service.create_api_key(session, actor, name=form.get("name"),
                                                 role=Role(form.get("role")),
                                                 owner_id=actor.user_id)
            session.commit()
        except CircusError as exc:
            session.rollback()
            form.fail(exc)
        else:
            # the secret is shown once, on this response, never again
            return _settings_page(created=(key, secret))
    return _settings_page(key=form)


@blueprint.post("/settings/api-keys/<id:key_id>/revoke")
@page("settings")
def revoke_api_key(key_id: int) -> ResponseReturnValue:
    session = db_session()
    key = service.revoke_api_key(session, current_actor(), key_id)
    session.commit()
    flash(f"API key {key.name} revoked.", "ok")
    return redirect(url_for("dashboard.user_settings"))

