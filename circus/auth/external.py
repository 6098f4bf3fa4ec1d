"""Users who prove who they are elsewhere (GitHub, an LDAP directory).

One write path for both providers: :func:`sign_in` finds the user by
``(user_type, external_id)`` or creates one, and refuses disabled users. The
provider's account id (GitHub's numeric user id, the entry's DN) is the
identity, never the name: names change and may collide with local users.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from circus import audit
from circus.auth.actor import Actor
from circus.auth.service import USERNAME_RE, find_user
from circus.common.enums import Role, UserType
from circus.common.errors import Conflict, PermissionDenied
from circus.common.models import User
from circus.rows import insert_unique

#: a username may use only these characters (``USERNAME_RE``); others become ``_``
_NOT_USERNAME = re.compile(r"[^A-Za-z0-9._@-]")
#: tries of ``<name>-<provider>-<n>`` before giving up on a free username
_MAX_SUFFIX = 100


@dataclass(frozen=True)
class ExternalIdentity:
    """What a provider vouches for after a successful login."""

    user_type: UserType
    #: stable id at the provider: GitHub user id, normalised DN
    external_id: str
    #: the name to give a new user (made unique and valid by :func:`sign_in`)
    username: str
    email: str | None = None
    full_name: str | None = None
    #: a role the provider decides (LDAP group mapping): applied at every login
    role: Role | None = None


def find_external_user(session: Session, user_type: UserType, external_id: str) -> User | None:
    return session.scalar(select(User).where(User.user_type == user_type,
                                             User.external_id == external_id))


def sign_in(session: Session, identity: ExternalIdentity, *, default_role: Role,
            remote_addr: str | None = None) -> User:
    """The user behind ``identity``, created on first login with ``default_role``.

    Later logins keep the user's role (an admin may have changed it) and name,
    and fill in an email or full name only where the user has none. A disabled
    user is refused with ``PermissionDenied``. The caller starts the session and
    commits.
    """
    user = find_external_user(session, identity.user_type, identity.external_id)
    if user is None:
        try:
            user = _create(session, identity, identity.role or default_role, remote_addr)
        except Conflict:
            # a concurrent first login of the same account won the race: use its row
            user = find_external_user(session, identity.user_type, identity.external_id)
            if user is None:
                raise
    if not user.enabled:
        raise PermissionDenied("this account is disabled",
                               {"hint": "ask an administrator to enable it"})
    if identity.role is not None and user.role is not identity.role:
        audit.record(session, Actor.system(f"{identity.user_type.value}-login"), "user.update",
                     f"user:{user.username}", {"role": identity.role.value,
                                               "previous_role": user.role.value,
                                               "reason": "directory groups"})
        user.role = identity.role
    if identity.email and not user.email:
        user.email = identity.email
    if identity.full_name and not user.full_name:
        user.full_name = identity.full_name
    return user


def _create(session: Session, identity: ExternalIdentity, role: Role,
            remote_addr: str | None) -> User:
    username = free_username(session, identity.username, identity.user_type.value)
    user = User(username=username, email=identity.email, full_name=identity.full_name,
                role=role, enabled=True, user_type=identity.user_type,
                external_id=identity.external_id, password_hash=None)
    insert_unique(session, user, f"user {username!r} already exists")
    audit.record(session, Actor.system(f"{identity.user_type.value}-login"), "user.create",
                 f"user:{username}", {"user_type": identity.user_type.value,
                                      "external_id": identity.external_id,
                                      "role": role.value, "remote_addr": remote_addr})
    return user


def free_username(session: Session, wanted: str, provider: str) -> str:
    """``wanted`` made valid, or ``<wanted>-<provider>[-<n>]`` when someone has it."""
    base = _NOT_USERNAME.sub("_", wanted.strip())[:100].lstrip("._@-") or provider
    candidates = [base, f"{base}-{provider}"] + [
        f"{base}-{provider}-{n}" for n in range(2, _MAX_SUFFIX)]
    for candidate in candidates:
        if USERNAME_RE.match(candidate) and find_user(session, candidate) is None:
            return candidate
    raise Conflict(f"no free username for {wanted!r}",
                   {"hint": "an administrator can rename the users who hold these names"})
