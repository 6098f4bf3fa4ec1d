"""Remote (SSH) builders: the write path for the API, CLI and declarative config."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from circus import audit
from circus.auth.actor import Actor
from circus.auth.permissions import Action, require_permission
from circus.common.errors import Conflict, InvalidInput, NotFound
from circus.common.models import RemoteBuilder
from circus.queue_runner.ssh.hosts import HostKeyFormatError, parse_host_keys, parse_ssh_uri
from circus.rows import apply_changes, apply_managed, insert_unique

BUILDER_FIELDS = ("ssh_uri", "systems", "max_jobs", "speed_factor", "supported_features",
                  "mandatory_features", "ssh_key_file", "public_host_key", "enabled")


def get_builder(session: Session, builder_id: int) -> RemoteBuilder:
    row = session.get(RemoteBuilder, builder_id)
    if row is None:
        raise NotFound(f"no remote builder with id {builder_id}")
    return row


def _check(values: dict[str, Any]) -> None:
    uri = values.get("ssh_uri")
    if uri is not None:
        try:
            parse_ssh_uri(uri)
        except ValueError as exc:
            raise InvalidInput("invalid ssh_uri", {"ssh_uri": [
                f"{exc}; use user@host, ssh://user@host[:port] or ssh-ng://user@host"]}
            ) from None
    key = values.get("public_host_key")
    if key is not None and key.strip():
        try:
            parse_host_keys(key)
        except HostKeyFormatError as exc:
            raise InvalidInput("invalid public_host_key", {"public_host_key": [
                f"{exc}; give 'ssh-ed25519 AAAA...' or a known_hosts line "
                "(ssh-keyscan <host>)"]}) from None


def create_builder(session: Session, actor: Actor, *, name: str, ssh_uri: str,
                   managed: bool = False, **values: Any) -> RemoteBuilder:
    require_permission(session, actor, Action.builder_manage)
    _check({"ssh_uri": ssh_uri, **values})
    if session.scalar(select(RemoteBuilder.id).where(RemoteBuilder.name == name)) is not None:
        raise Conflict(f"builder {name!r} already exists", {"name": name})
    row = RemoteBuilder(name=name, ssh_uri=ssh_uri, managed_declaratively=managed,
                        **{k: v for k, v in values.items() if k in BUILDER_FIELDS})
    insert_unique(session, row, f"builder {name!r} already exists", {"name": name})
    audit.record(session, actor, "builder.create", f"builder:{name}", {"ssh_uri": ssh_uri})
    return row


def update_builder(session: Session, actor: Actor, builder: RemoteBuilder,
                   changes: dict[str, Any], *, managed: bool | None = None) -> RemoteBuilder:
    require_permission(session, actor, Action.builder_manage)
    _check(changes)
    applied = apply_changes(builder, changes, BUILDER_FIELDS)
    forgive_if_changed(builder, applied)
    applied |= apply_managed(builder, managed)
    if applied:
        audit.record(session, actor, "builder.update", f"builder:{builder.name}", applied)
    return builder


#: changing one of these is fixing the builder's configuration
CONNECTION_FIELDS = frozenset({"ssh_uri", "ssh_key_file", "public_host_key"})


def forgive_if_changed(builder: RemoteBuilder, applied: dict[str, Any]) -> None:
    """Re-enabling a builder, or changing how to reach it, ends its back-off: the
    failures it records were an older configuration's."""
    if applied.get("enabled") is True or CONNECTION_FIELDS & set(applied):
        builder.consecutive_failures = 0
        builder.disabled_until = None


def delete_builder(session: Session, actor: Actor, builder: RemoteBuilder) -> None:
    require_permission(session, actor, Action.builder_manage)
    session.delete(builder)
    audit.record(session, actor, "builder.delete", f"builder:{builder.name}")
