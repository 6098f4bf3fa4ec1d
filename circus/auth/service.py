"""Users and API keys: the one write path for the API, dashboard, CLI and config."""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import false, func, select
from sqlalchemy.orm import Session

from circus import audit
from circus.auth import api_keys, passwords
from circus.auth.actor import Actor
from circus.auth.permissions import (
    Action,
    require_authenticated,
    require_permission,
    require_writable,
)
from circus.auth.sessions import end_user_sessions
from circus.auth.tokens import digest
from circus.common.enums import Role, UserType
from circus.common.errors import Conflict, InvalidInput, NotFound, PermissionDenied
from circus.common.models import ApiKey, User
from circus.common.models.base import utcnow
from circus.rows import apply_changes, apply_managed, insert_unique

USERNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$")
USER_FIELDS = ("email", "full_name", "role", "enabled")


def get_user(session: Session, user_id: int) -> User:
    user = session.get(User, user_id)
    if user is None:
        raise NotFound(f"no user with id {user_id}")
    return user


def find_user(session: Session, username: str) -> User | None:
    return session.scalar(select(User).where(User.username == username))


def check_password_strength(password: str) -> None:
    if len(password) < passwords.MIN_LENGTH:
        raise InvalidInput("password too short",
                           {"password": [f"must be at least {passwords.MIN_LENGTH} characters"]})


def create_user(session: Session, actor: Actor, *, username: str, password: str | None = None,
                email: str | None = None, full_name: str | None = None,
                role: Role = Role.read_only, enabled: bool = True,
                managed: bool = False) -> User:
    require_permission(session, actor, Action.user_manage)
    if not USERNAME_RE.match(username):
        raise InvalidInput("invalid username", {"username": [
            "letters, digits and . _ @ - only, starting with a letter or digit, at most 128"]})
    if find_user(session, username) is not None:
        raise Conflict(f"user {username!r} already exists", {"username": username})
    if password is not None:
        check_password_strength(password)
    user = User(username=username, email=email, full_name=full_name, role=role,
                enabled=enabled, user_type=UserType.local, managed_declaratively=managed,
                password_hash=passwords.hash_password(password) if password else None)
    insert_unique(session, user, f"user {username!r} already exists")
    audit.record(session, actor, "user.create", f"user:{username}",
                 {"role": role.value, "enabled": enabled})
    return user


def update_user(session: Session, actor: Actor, user_id: int, changes: dict[str, Any], *,
                managed: bool | None = None) -> User:
    require_permission(session, actor, Action.user_manage)
    user = get_user(session, user_id)
    if changes.get("password") is not None and user.user_type is not UserType.local:
        raise InvalidInput(f"{user.username} logs in through {user.user_type.value}: "
                           "a local password would never be checked",
                           {"password": ["not for GitHub or LDAP users"]})
    applied = apply_changes(user, changes, USER_FIELDS)
    if "password" in changes and changes["password"] is not None:
        check_password_strength(changes["password"])
        user.password_hash = passwords.hash_password(changes["password"])
        end_user_sessions(session, user.id)
        applied["password"] = "changed"
    if applied.get("enabled") is False:
        end_user_sessions(session, user.id)
    applied |= apply_managed(user, managed)
    if applied:
        audit.record(session, actor, "user.update", f"user:{user.username}", applied)
    return user


def delete_user(session: Session, actor: Actor, user_id: int) -> None:
    require_permission(session, actor, Action.user_manage)
    user = get_user(session, user_id)
    if actor.user_id == user.id:
        raise Conflict("you cannot delete yourself")
    session.delete(user)
    audit.record(session, actor, "user.delete", f"user:{user.username}")


def update_me(session: Session, actor: Actor, changes: dict[str, Any]) -> User:
    require_writable(actor)
    user = current_user_row(session, actor)
    applied = apply_changes(user, changes, ("email", "full_name"))
    audit.record(session, actor, "me.update", f"user:{user.username}", applied)
    return user


def change_password(session: Session, actor: Actor, current: str, new: str) -> None:
    require_writable(actor)
    user = current_user_row(session, actor)
    if user.user_type is not UserType.local:
        raise InvalidInput(f"your password is managed by {user.user_type.value}, not by Circus",
                           {"new_password": [f"change it at {user.user_type.value}"]})
    if not user.password_hash and actor.limited:
        # a first password logs in as the whole account: only a caller that can already
        # do everything the account can (a session, a key with the owner's role) sets it
        raise PermissionDenied(
            f"{actor.label} has less than {user.username}'s role and cannot set the "
            "account's first password", {"hint": "log in, or use a key with your role"})
    if user.password_hash and not passwords.verify_password(user.password_hash, current):
        raise PermissionDenied("current password is wrong", {"current_password": ["wrong"]})
    check_password_strength(new)
    user.password_hash = passwords.hash_password(new)
    end_user_sessions(session, user.id)
    audit.record(session, actor, "me.password", f"user:{user.username}")


def current_user_row(session: Session, actor: Actor) -> User:
    require_authenticated(actor)
    if actor.user_id is None:
        raise NotFound("this API key has no owner user", {"hint": "use a user's key or log in"})
    return get_user(session, actor.user_id)


def authenticate_password(session: Session, username: str, password: str) -> User | None:
    """The enabled local user with this password, else ``None`` (same time either way).

    GitHub and LDAP users never log in with a local password: their provider decides.
    """
    user = find_user(session, username)
    if user is None or not user.enabled or user.user_type is not UserType.local:
        passwords.verify_password(None, password)
        return None
    if not passwords.verify_password(user.password_hash, password):
        return None
    if passwords.needs_rehash(user.password_hash or ""):
        user.password_hash = passwords.hash_password(password)
    return user


# ---------------------------------------------------------------------------
# API keys


def create_api_key(session: Session, actor: Actor, *, name: str, role: Role | None = None,
                   owner_id: int | None = None, secret: str | None = None,
                   managed: bool = False) -> tuple[ApiKey, str]:
    """Create a key; returns it with its secret, which is never shown again.

    Anyone authenticated may make keys for themselves with their own role or
    ``read-only``; admins may make keys of any role for anyone (or no one). A
    read-only key makes none.
    """
    require_writable(actor)
    name = name.strip()
    if not name or len(name) > 128:
        raise InvalidInput("invalid key name", {"name": ["1 to 128 characters"]})
    if actor.is_admin:
        role = role or Role.read_only
        if owner_id is not None:
            get_user(session, owner_id)
    else:
        if owner_id is not None and owner_id != actor.user_id:
            raise PermissionDenied("only admins create keys for other users")
        if actor.user_id is None:
            raise PermissionDenied("a key without an owner cannot create keys")
        owner_id = actor.user_id
        role = role or actor.role or Role.read_only
        if role not in (actor.role, Role.read_only):
            raise PermissionDenied(f"you cannot create a key with role {role.value}",
                                   {"role": [f"must be {actor.role} or read-only"]})
    secret = secret or api_keys.generate()
    key = ApiKey(name=name, key_hash=digest(secret), key_prefix=api_keys.prefix_of(secret),
                 role=role, owner_id=owner_id, managed_declaratively=managed)
    insert_unique(session, key, "a key with this secret already exists")
    audit.record(session, actor, "api_key.create", f"api_key:{key.id}",
                 {"name": name, "role": role.value, "owner_id": owner_id})
    return key, secret


def update_api_key(session: Session, actor: Actor, key: ApiKey, *, secret: str, role: Role,
                   owner_id: int | None, managed: bool | None = None) -> ApiKey:
    """Give a key another secret, role or owner, reinstating it if it was revoked: how the
    declarative configuration keeps a declared key as written. Admins only."""
    require_permission(session, actor, Action.user_manage)
    if owner_id is not None:
        get_user(session, owner_id)
    hashed = digest(secret)
    if hashed != key.key_hash and session.scalar(
            select(ApiKey.id).where(ApiKey.key_hash == hashed)) is not None:
        raise Conflict("a key with this secret already exists")
    applied = apply_changes(key, {"key_hash": hashed, "key_prefix": api_keys.prefix_of(secret),
                                  "role": role, "owner_id": owner_id, "revoked_at": None},
                            ("key_hash", "key_prefix", "role", "owner_id", "revoked_at"))
    applied |= apply_managed(key, managed)
    if "key_hash" in applied:
        applied["key_hash"] = "changed"  # neither the hash nor the prefix is audit material
        applied.pop("key_prefix", None)
    if applied:
        audit.record(session, actor, "api_key.update", f"api_key:{key.id}",
                     {"name": key.name, **applied})
    return key


def list_api_keys_query(actor: Actor, *, all_keys: bool = False) -> Any:
    require_authenticated(actor)
    query = select(ApiKey).order_by(ApiKey.id)
    if actor.user_id is None and not actor.is_admin:
        # ``owner_id == None`` is SQL's IS NULL: an ownerless key would list every other
        # ownerless key (an admin's robot's among them); it owns none of them
        return query.where(false())
    if not (actor.is_admin and all_keys):
        query = query.where(ApiKey.owner_id == actor.user_id)
    return query


def get_own_api_key(session: Session, actor: Actor, key_id: int) -> ApiKey:
    """A key the actor may see: any for admins, else one the actor's user owns (a 404
    for the rest). A key without an owner is nobody's own: two ownerless keys do not
    own each other."""
    require_authenticated(actor)
    key = session.get(ApiKey, key_id)
    if key is None or not (actor.is_admin or (
            actor.user_id is not None and key.owner_id == actor.user_id)):
        raise NotFound(f"no API key with id {key_id}")
    return key


def revoke_api_key(session: Session, actor: Actor, key_id: int) -> ApiKey:
    require_writable(actor)
    key = get_own_api_key(session, actor, key_id)
    if key.revoked_at is None:
        key.revoked_at = utcnow()
    audit.record(session, actor, "api_key.revoke", f"api_key:{key.id}", {"name": key.name})
    return key


def count_users(session: Session) -> int:
    return int(session.scalar(select(func.count()).select_from(User)) or 0)
