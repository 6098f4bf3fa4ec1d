"""Who is doing something: a user, an API key, nobody, or Circus itself."""

from __future__ import annotations

from dataclasses import dataclass

from circus.common.enums import ActorKind, Role


@dataclass(frozen=True)
class Actor:
    kind: ActorKind
    #: username, ``key:<name>`` for API keys, ``None`` for anonymous
    name: str | None = None
    role: Role | None = None
    #: the user (for an API key: its owner) whose project memberships count
    user_id: int | None = None
    api_key_id: int | None = None
    remote_addr: str | None = None
    #: an API key narrower than its owner (its role is not the owner's current one):
    #: it cannot do what only the whole account may (set a first password)
    limited: bool = False
    #: a read-only key of an owner who has more: no writes at all, not even with the
    #: owner's project memberships or on the owner's own account
    read_only: bool = False

    @classmethod
    def anonymous(cls, remote_addr: str | None = None) -> Actor:
        return cls(ActorKind.anonymous, remote_addr=remote_addr)

    @classmethod
    def system(cls, name: str = "system") -> Actor:
        """Circus acting on its own behalf (declarative config, maintenance)."""
        return cls(ActorKind.system, name=name, role=Role.admin)

    @property
    def is_authenticated(self) -> bool:
        return self.kind is not ActorKind.anonymous

    @property
    def is_admin(self) -> bool:
        return self.kind is ActorKind.system or self.role is Role.admin

    @property
    def label(self) -> str:
        return self.name or self.kind.value
