"""People and credentials: users, sessions, API keys, stars."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, Index, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from circus.common.enums import Role, UserType
from circus.common.models.base import Base, BoolFalse, BoolTrue, CreatedAt, IntPK, enum_column


class User(Base):
    __tablename__ = "users"

    id: Mapped[IntPK]
    username: Mapped[str] = mapped_column(unique=True)
    email: Mapped[str | None]
    full_name: Mapped[str | None]
    #: argon2id; None for users that only log in through GitHub or LDAP
    password_hash: Mapped[str | None]
    user_type: Mapped[UserType] = mapped_column(
        enum_column(UserType, "user_type"), default=UserType.local,
        server_default=UserType.local.value)
    #: id at the external provider (GitHub user id, LDAP DN)
    external_id: Mapped[str | None]
    role: Mapped[Role] = mapped_column(enum_column(Role, "role"), default=Role.read_only,
                                       server_default=Role.read_only.value)
    enabled: Mapped[BoolTrue]
    managed_declaratively: Mapped[BoolFalse]
    last_login_at: Mapped[datetime | None]
    created_at: Mapped[CreatedAt]

    __table_args__ = (
        Index("uq_users_user_type_external_id", "user_type", "external_id", unique=True,
              postgresql_where="external_id IS NOT NULL"),
    )


class UserSession(Base):
    __tablename__ = "user_sessions"

    id: Mapped[IntPK]
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    #: SHA-256 of the session token held in the cookie
    token_hash: Mapped[str] = mapped_column(unique=True)
    created_at: Mapped[CreatedAt]
    expires_at: Mapped[datetime]
    last_seen_at: Mapped[datetime | None]
    remote_addr: Mapped[str | None]


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[IntPK]
    name: Mapped[str]
    #: SHA-256 of the secret; the secret itself is shown once at creation
    key_hash: Mapped[str] = mapped_column(unique=True)
    #: first characters of the secret, to recognise a key in lists
    key_prefix: Mapped[str]
    role: Mapped[Role] = mapped_column(enum_column(Role, "role"), default=Role.read_only)
    owner_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"),
                                                 index=True)
    managed_declaratively: Mapped[BoolFalse]
    created_at: Mapped[CreatedAt]
    last_used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]


class StarredJob(Base):
    __tablename__ = "starred_jobs"

    id: Mapped[IntPK]
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    jobset_id: Mapped[int] = mapped_column(ForeignKey("jobsets.id", ondelete="CASCADE"),
                                           index=True)
    job_name: Mapped[str]
    created_at: Mapped[CreatedAt]

    __table_args__ = (UniqueConstraint("user_id", "jobset_id", "job_name"),)
