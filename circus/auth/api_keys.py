"""API keys: ``Authorization: Bearer <secret>``; the database keeps only SHA-256."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from circus.auth.actor import Actor
from circus.auth.tokens import digest, new_secret
from circus.common.enums import ActorKind, Role
from circus.common.models import ApiKey, User
from circus.common.models.base import utcnow

PREFIX_LENGTH = 12
_TOUCH_INTERVAL = timedelta(minutes=1)


def generate() -> str:
    return new_secret("circus")


def prefix_of(secret: str) -> str:
    return secret[:PREFIX_LENGTH]


def authenticate(session: Session, secret: str, remote_addr: str | None = None
                 ) -> Actor | None:
    """The actor a bearer token stands for; ``None`` when unknown, revoked or disabled.

    Revocation takes effect on the next request: every request looks the key up.
    """
    row = session.execute(
        select(ApiKey, User).outerjoin(User, User.id == ApiKey.owner_id)
        .where(ApiKey.key_hash == digest(secret), ApiKey.revoked_at.is_(None))).first()
    if row is None:
        return None
    key: ApiKey = row[0]
    owner: User | None = row[1]
    if owner is not None and not owner.enabled:
        return None
    now = utcnow()
    if key.last_used_at is None or now - key.last_used_at > _TOUCH_INTERVAL:
        touch(session, key.id, now)
    if owner is None:
        # only admins make keys without an owner: nobody's account to be bounded by,
        # no memberships; a read-only one is granted nothing by its role already
        return Actor(ActorKind.api_key, name=f"key:{key.name}", role=key.role,
                     api_key_id=key.id, remote_addr=remote_addr)
    full = key.role is owner.role
    return Actor(ActorKind.api_key, name=f"key:{key.name}",
                 role=effective_role(key.role, owner.role), user_id=key.owner_id,
                 api_key_id=key.id, remote_addr=remote_addr, limited=not full,
                 read_only=key.role is Role.read_only and not full)


def touch(session: Session, key_id: int, now: datetime) -> None:
    """Record that a key was used: at most once a minute, in its own short transaction.

    Not in the request's transaction: that would hold the key's row lock until the
    request ends (every request with one shared key then waits for the previous
    one), and a read request's rollback would undo it. A row another request is
    touching right now is skipped, never waited for.
    """
    with session.get_bind().engine.connect() as connection:
        locked = connection.execute(
            select(ApiKey.id).where(
                ApiKey.id == key_id,
                or_(ApiKey.last_used_at.is_(None), ApiKey.last_used_at < now - _TOUCH_INTERVAL))
            .with_for_update(skip_locked=True)).first()
        if locked is not None:
            connection.execute(update(ApiKey).where(ApiKey.id == key_id)
                               .values(last_used_at=now))
        connection.commit()


def effective_role(key_role: Role, owner_role: Role) -> Role:
    """What a key may do globally: never more than its owner's *current* role.

    The owner's role is read on every request, so demoting the owner demotes every
    key at once. Roles other than ``admin`` grant disjoint actions, so the
    intersection of two different ones is ``read-only``.
    """
    if key_role is owner_role or owner_role is Role.admin:
        return key_role
    if key_role is Role.admin:
        return owner_role
    return Role.read_only
