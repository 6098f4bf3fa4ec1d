"""/api/v1 users, me, starred jobs, API keys, login/logout."""

from __future__ import annotations

from typing import Any

from flask import flash, redirect, request, url_for
from flask.typing import ResponseReturnValue
from flask_wtf.csrf import generate_csrf
from marshmallow import EXCLUDE, ValidationError
from sqlalchemy import select

from circus import audit
from circus.auth import service
from circus.auth.actor import Actor
from circus.auth.permissions import Action, require_permission
from circus.auth.visibility import only_visible, require_visible
from circus.common.enums import ActorKind
from circus.common.errors import CircusError, Conflict, InvalidInput, NotFound, Unauthenticated
from circus.common.models import Jobset, Project, ProjectMember, StarredJob, User
from circus.projects.service import get_jobset_by_id
from circus.server import auth
from circus.server import github_login as github_flow
from circus.server.api.base import Blueprint, paginate
from circus.server.api.schemas.common import PageArgs, page_of
from circus.server.api.schemas.users import (
    ApiKeyCreatedSchema,
    ApiKeyCreateSchema,
    ApiKeyFilterSchema,
    ApiKeySchema,
    CsrfSchema,
    GithubCallbackSchema,
    GithubStartSchema,
    LoginResultSchema,
    LoginSchema,
    MeSchema,
    MeUpdateSchema,
    PasswordChangeSchema,
    StarredJobCreateSchema,
    StarredJobSchema,
    UserCreateSchema,
    UserFilterSchema,
    UserSchema,
    UserUpdateSchema,
)
from circus.server.auth import current_actor, log_out
from circus.server.context import db_session

blp = Blueprint("users", __name__, url_prefix="/api/v1",
                description="Users, the current user, API keys and login")


# ---------------------------------------------------------------------------
# users (admin)


@blp.get("/users")
@blp.arguments(UserFilterSchema, location="query")
@blp.response(200, page_of(UserSchema))
def list_users(args: dict[str, Any]) -> Any:
    session = db_session()
    require_permission(session, current_actor(), Action.user_manage)
    query = select(User).order_by(User.username)
    if "q" in args:
        query = query.where(User.username.icontains(args["q"], autoescape=True))
    if "role" in args:
        query = query.where(User.role == args["role"])
    return paginate(session, query, args)


@blp.post("/users")
@blp.arguments(UserCreateSchema)
@blp.response(201, UserSchema)
def create_user(data: dict[str, Any]) -> Any:
    session = db_session()
    user = service.create_user(session, current_actor(), **data)
    session.commit()
    return user


@blp.get("/users/<id:user_id>")
@blp.response(200, UserSchema)
def get_user(user_id: int) -> Any:
    session = db_session()
    actor = current_actor()
    if actor.user_id != user_id:
        require_permission(session, actor, Action.user_manage)
    return service.get_user(session, user_id)


@blp.put("/users/<id:user_id>")
@blp.arguments(UserUpdateSchema)
@blp.response(200, UserSchema)
def update_user(data: dict[str, Any], user_id: int) -> Any:
    session = db_session()
    user = service.update_user(session, current_actor(), user_id, data)
    session.commit()
    return user


@blp.delete("/users/<id:user_id>")
@blp.response(204)
def delete_user(user_id: int) -> ResponseReturnValue:
    session = db_session()
    service.delete_user(session, current_actor(), user_id)
    session.commit()
    return ""


# ---------------------------------------------------------------------------
# me


def _me(actor: Actor) -> Any:
    session = db_session()
    user = service.current_user_row(session, actor)
    roles = session.execute(select(Project.name, ProjectMember.role).join(
        Project, Project.id == ProjectMember.project_id).where(ProjectMember.user_id == user.id))
    user.project_roles = {name: role.value for name, role in roles}  # type: ignore[attr-defined]
    user.auth = "api_key" if actor.kind is ActorKind.api_key else "session"  # type: ignore[attr-defined]
    return user


@blp.get("/me")
@blp.response(200, MeSchema)
def me() -> Any:
    return _me(current_actor())


@blp.put("/me")
@blp.arguments(MeUpdateSchema)
@blp.response(200, MeSchema)
def update_me(data: dict[str, Any]) -> Any:
    session = db_session()
    service.update_me(session, current_actor(), data)
    session.commit()
    return _me(current_actor())


@blp.post("/me/password")
@blp.arguments(PasswordChangeSchema)
@blp.response(204)
def change_password(data: dict[str, Any]) -> ResponseReturnValue:
    session = db_session()
    service.change_password(session, current_actor(), data["current_password"],
                            data["new_password"])
    session.commit()
    return ""


@blp.get("/me/starred-jobs")
@blp.arguments(PageArgs, location="query")
@blp.response(200, page_of(StarredJobSchema))
def starred(args: dict[str, Any]) -> Any:
    session = db_session()
    user = service.current_user_row(session, current_actor())
    query = only_visible(select(StarredJob).join(Jobset, Jobset.id == StarredJob.jobset_id)
                         .where(StarredJob.user_id == user.id), Jobset.project_id,
                         current_actor()).order_by(StarredJob.id)
    return paginate(session, query, args)


@blp.post("/me/starred-jobs")
@blp.arguments(StarredJobCreateSchema)
@blp.response(201, StarredJobSchema)
def star(data: dict[str, Any]) -> Any:
    session = db_session()
    actor = current_actor()
    user = service.current_user_row(session, actor)
    jobset = get_jobset_by_id(session, data["jobset_id"])
    require_visible(session, actor, jobset.project_id, f"jobset with id {jobset.id}")
    existing = session.scalar(select(StarredJob).where(
        StarredJob.user_id == user.id, StarredJob.jobset_id == data["jobset_id"],
        StarredJob.job_name == data["job_name"]))
    if existing is not None:
        raise Conflict("job already starred", {"id": existing.id})
    row = StarredJob(user_id=user.id, **data)
    session.add(row)
    session.flush()
    audit.record(session, actor, "star.create", f"jobset:{data['jobset_id']}/{data['job_name']}")
    session.commit()
    return row


@blp.delete("/me/starred-jobs/<id:star_id>")
@blp.response(204)
def unstar(star_id: int) -> ResponseReturnValue:
    session = db_session()
    actor = current_actor()
    user = service.current_user_row(session, actor)
    row = session.get(StarredJob, star_id)
    if row is None or row.user_id != user.id:
        raise NotFound(f"no starred job {star_id}")
    session.delete(row)
    audit.record(session, actor, "star.delete", f"jobset:{row.jobset_id}/{row.job_name}")
    session.commit()
    return ""


# ---------------------------------------------------------------------------
# API keys


@blp.get("/api-keys")
@blp.arguments(ApiKeyFilterSchema, location="query")
@blp.response(200, page_of(ApiKeySchema))
def list_keys(args: dict[str, Any]) -> Any:
    return paginate(db_session(), service.list_api_keys_query(current_actor(),
                                                              all_keys=args["all"]), args)


@blp.post("/api-keys")
@blp.arguments(ApiKeyCreateSchema)
@blp.response(201, ApiKeyCreatedSchema)
def create_key(data: dict[str, Any]) -> Any:
    session = db_session()
    key, secret = service.create_api_key(session, current_actor(), **data)
    session.commit()
    key.key = secret  # type: ignore[attr-defined]
    return key


@blp.delete("/api-keys/<id:key_id>")
@blp.response(204)
def revoke_key(key_id: int) -> ResponseReturnValue:
    session = db_session()
    service.revoke_api_key(session, current_actor(), key_id)
    session.commit()
    return ""


@blp.get("/api-keys/<id:key_id>")
@blp.response(200, ApiKeySchema)
def get_key(key_id: int) -> Any:
    return service.get_own_api_key(db_session(), current_actor(), key_id)


# ---------------------------------------------------------------------------
# login


_LOGIN_BODY = {"required": True, "content": {
    media: {"schema": "Login"}
    for media in ("application/json", "application/x-www-form-urlencoded")}}


def _login_form() -> dict[str, Any]:
    """Username and password from JSON or a form post (400 naming what is wrong)."""
    raw = request.get_json(silent=True) if request.is_json else request.form.to_dict()
    try:
        data: dict[str, Any] = LoginSchema(unknown=EXCLUDE).load(
            raw if isinstance(raw, dict) else {})
    except ValidationError as exc:
        messages: Any = exc.messages
        raise InvalidInput("invalid input: " + ", ".join(messages), {"json": messages}) from exc
    return data


@blp.post("/auth/login")
@blp.doc(requestBody=_LOGIN_BODY)
@blp.response(200, LoginResultSchema)
def login() -> Any:
    """Start a browser session (cookie); answers with a CSRF token for later mutations.

    Takes JSON or a form post (a form post needs the ``csrf_token`` field).
    """
    data = _login_form()
    user = auth.password_login(data["username"], data["password"])
    if user is None:
        raise Unauthenticated("invalid username or password")
    token = generate_csrf()
    return {"user": user, "csrf_token": token}


@blp.post("/auth/ldap")
@blp.doc(requestBody=_LOGIN_BODY)
@blp.response(200, LoginResultSchema)
def ldap_login() -> Any:
    """Log in with an LDAP directory account (``server.ldap``): a session like ``/auth/login``.

    The first login creates a user (``user_type`` ldap, ``server.ldap.default_role``).
    401 for a wrong username or password, 403 for a disabled user, 503 when the
    directory cannot be reached, 404 when LDAP is not enabled.
    """
    data = _login_form()
    user = auth.ldap_login(data["username"], data["password"])
    return {"user": user, "csrf_token": generate_csrf()}


@blp.get("/auth/github")
@blp.arguments(GithubStartSchema, location="query")
@blp.response(302, description="to GitHub's authorization page")
def github_login(args: dict[str, Any]) -> ResponseReturnValue:
    """Start a GitHub login (``oauth.github``): redirects to GitHub, which comes back to
    the callback. ``next`` is a path on this site to land on afterwards."""
    return github_flow.start(args.get("next"))


@blp.get("/auth/github/callback")
@blp.arguments(GithubCallbackSchema, location="query")
@blp.response(302, description="logged in: to `next` (default `/`)")
def github_callback(args: dict[str, Any]) -> ResponseReturnValue:
    """Where GitHub sends the browser back: checks ``state``, exchanges ``code``, logs in.

    The first login creates a user (``user_type`` github, ``oauth.github.default_role``).
    Failures answer JSON errors; a browser (``Accept: text/html``) is sent back to the
    login page with the message instead.
    """
    target = github_flow.pending_target()
    try:
        github_flow.finish()
    except CircusError as exc:
        if not _browser():
            raise
        flash(f"GitHub login failed: {exc.message}", "error")
        return redirect(url_for("dashboard.login", next=target))
    return redirect(target)


def _browser() -> bool:
    accept = request.accept_mimetypes
    return accept.best_match(["application/json", "text/html"]) == "text/html"


@blp.post("/auth/logout")
@blp.response(204)
def logout() -> ResponseReturnValue:
    actor = current_actor()
    if actor.kind is ActorKind.api_key:
        raise InvalidInput("API keys have no session to end",
                           {"hint": "revoke the key with DELETE /api/v1/api-keys/{id}"})
    if actor.is_authenticated:
        audit.record(db_session(), actor, "auth.logout", f"user:{actor.name}")
    log_out()
    db_session().commit()
    return ""


@blp.get("/auth/csrf")
@blp.response(200, CsrfSchema)
def csrf_token() -> Any:
    """A CSRF token for this browser session (send it as ``X-CSRFToken``)."""
    return {"csrf_token": generate_csrf()}
