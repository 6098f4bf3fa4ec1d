"""Login sessions: the cookie holds a random token, the database its SHA-256."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from circus.auth.tokens import digest, new_secret
from circus.common.models import User, UserSession
from circus.common.models.base import utcnow

#: refresh ``last_seen_at`` at most this often (one write per request would be wasteful)
_TOUCH_INTERVAL = timedelta(minutes=5)


def create_session(session: Session, user: User, *, lifetime: timedelta,
                   remote_addr: str | None = None) -> str:
    """Start a session for ``user``; returns the token for the cookie (never stored)."""
    token = new_secret("cs")
    now = utcnow()
    session.add(UserSession(user_id=user.id, token_hash=digest(token), expires_at=now + lifetime,
                            last_seen_at=now, remote_addr=remote_addr))
    user.last_login_at = now
    return token


def load_session(session: Session, token: str) -> tuple[UserSession, User] | None:
    """The live session and its enabled user, or ``None``."""
    row = session.execute(
        select(UserSession, User).join(User, User.id == UserSession.user_id)
        .where(UserSession.token_hash == digest(token))).first()
    if row is None:
        return None
    user_session, user = row.tuple()
    now = utcnow()
    if user_session.expires_at <= now or not user.enabled:
        return None
    if user_session.last_seen_at is None or now - user_session.last_seen_at > _TOUCH_INTERVAL:
        user_session.last_seen_at = now
    return user_session, user


def end_session(session: Session, token: str) -> None:
    session.execute(delete(UserSession).where(UserSession.token_hash == digest(token)))


def end_user_sessions(session: Session, user_id: int) -> None:
    """Log a user out everywhere (password change, disable, delete)."""
    session.execute(delete(UserSession).where(UserSession.user_id == user_id))


def purge_expired(session: Session) -> int:
    result = session.execute(delete(UserSession).where(UserSession.expires_at <= utcnow()))
    return int(getattr(result, "rowcount", 0) or 0)
