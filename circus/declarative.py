"""Apply ``[declarative]``: upsert users, API keys, builders and projects at start.

Idempotent: applying the same settings twice changes nothing the second time
(no UPDATE, no audit row). Objects it creates are marked
``managed_declaratively``; a managed object that disappears from the file is
disabled (users, builders, projects, jobsets, webhooks, notifications) or
revoked (API keys) rather than deleted, so its history stays. Channels and
memberships hold no history and are removed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from circus import audit
from circus.auth import api_keys, passwords, sealing
from circus.auth.actor import Actor
from circus.auth.tokens import digest
from circus.common import localsource
from circus.common.config import (
    DeclarativeApiKey,
    DeclarativeBuilder,
    DeclarativeProject,
    DeclarativeSettings,
    DeclarativeUser,
    Settings,
)
from circus.common.enums import InputType, JobsetState, UserType
from circus.common.errors import InvalidInput
from circus.common.models import (
    ApiKey,
    Channel,
    Jobset,
    JobsetInput,
    NotificationConfig,
    Project,
    ProjectMember,
    RemoteBuilder,
    User,
    WebhookConfig,
)
from circus.common.models.base import utcnow
from circus.machines import service as machines
from circus.notifications.service import validate_config
from circus.projects import service
from circus.projects.service import check_server_path
from circus.rows import apply_changes

log = logging.getLogger(__name__)

#: serialises concurrent appliers (two servers starting at once)
LOCK_KEY = 0x43697263  # "Circ"


@dataclass
class Summary:
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    disabled: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, list[str]]:
        return {"created": self.created, "updated": self.updated, "disabled": self.disabled,
                "removed": self.removed}


class Applier:
    def __init__(self, session: Session, settings: Settings, actor: Actor) -> None:
        self.session = session
        self.settings = settings
        self.actor = actor
        self.summary = Summary()

    def note(self, kind: str, target: str, changes: dict[str, Any] | None = None) -> None:
        getattr(self.summary, kind).append(target)
        audit.record(self.session, self.actor, f"declarative.{kind}", target, changes or {})

    def changed(self, target: str, row: Any, values: dict[str, Any]) -> dict[str, Any]:
        applied = apply_changes(row, values, values.keys())
        if applied:
            self.note("updated", target, applied)
        return applied

    # -- users -------------------------------------------------------------

    def users(self, declared: list[DeclarativeUser]) -> None:
        names = {u.username for u in declared}
        for item in declared:
            target = f"user:{item.username}"
            user = self.session.scalar(select(User).where(User.username == item.username))
            if user is None:
                user = User(username=item.username, email=item.email, full_name=item.full_name,
                            role=item.role, enabled=item.enabled, user_type=UserType.local,
                            managed_declaratively=True,
                            password_hash=passwords.hash_password(item.password)
                            if item.password else None)
                self.session.add(user)
                self.note("created", target, {"role": item.role.value})
                continue
            self.changed(target, user, {"email": item.email, "full_name": item.full_name,
                                        "role": item.role, "enabled": item.enabled,
                                        "managed_declaratively": True})
            if item.password and not passwords.verify_password(user.password_hash,
                                                               item.password):
                user.password_hash = passwords.hash_password(item.password)
                self.note("updated", target, {"password": "changed"})
        for user in self.session.scalars(select(User).where(
                User.managed_declaratively.is_(True), User.enabled.is_(True))):
            if user.username not in names:
                user.enabled = False
                self.note("disabled", f"user:{user.username}")
        self.session.flush()

    def user_id(self, username: str | None, where: str) -> int | None:
        if username is None:
            return None
        user_id = self.session.scalar(select(User.id).where(User.username == username))
        if user_id is None:
            raise InvalidInput(f"declarative {where}: no user {username!r}",
                               {where: [f"unknown user {username!r}"]})
        return user_id

    # -- API keys ------------------------------------------------------------

    def api_keys(self, declared: list[DeclarativeApiKey]) -> None:
        names = {k.name for k in declared}
        for item in declared:
            target = f"api_key:{item.name}"
            owner = self.user_id(item.owner, f"api_keys.{item.name}.owner")
            key = self.session.scalar(select(ApiKey).where(
                ApiKey.name == item.name, ApiKey.managed_declaratively.is_(True)))
            hashed = digest(item.key)
            if key is None:
                clash = self.session.scalar(select(ApiKey).where(ApiKey.key_hash == hashed))
                if clash is not None:
                    raise InvalidInput(f"declarative api_keys.{item.name}: this key is "
                                       f"already in use by key {clash.name!r}")
                self.session.add(ApiKey(name=item.name, key_hash=hashed,
                                        key_prefix=api_keys.prefix_of(item.key), role=item.role,
                                        owner_id=owner, managed_declaratively=True))
                self.note("created", target, {"role": item.role.value})
                continue
            self.changed(target, key, {"key_hash": hashed,
                                       "key_prefix": api_keys.prefix_of(item.key),
                                       "role": item.role, "owner_id": owner, "revoked_at": None})
        for key in self.session.scalars(select(ApiKey).where(
                ApiKey.managed_declaratively.is_(True), ApiKey.revoked_at.is_(None))):
            if key.name not in names:
                key.revoked_at = utcnow()
                self.note("disabled", f"api_key:{key.name}")
        self.session.flush()

    # -- remote builders -----------------------------------------------------

    def builders(self, declared: list[DeclarativeBuilder]) -> None:
        names = {b.name for b in declared}
        for item in declared:
            target = f"builder:{item.name}"
            values = item.model_dump(exclude={"name"})
            row = self.session.scalar(select(RemoteBuilder).where(
                RemoteBuilder.name == item.name))
            if row is None:
                self.session.add(RemoteBuilder(name=item.name, managed_declaratively=True,
                                               **values))
                self.note("created", target)
                continue
            applied = self.changed(target, row, {**values, "managed_declaratively": True})
            machines.forgive_if_changed(row, applied)
        for row in self.session.scalars(select(RemoteBuilder).where(
                RemoteBuilder.managed_declaratively.is_(True), RemoteBuilder.enabled.is_(True))):
            if row.name not in names:
                row.enabled = False
                self.note("disabled", f"builder:{row.name}")
        self.session.flush()

    # -- projects ------------------------------------------------------------

    def projects(self, declared: list[DeclarativeProject]) -> None:
        names = {p.name for p in declared}
        for item in declared:
            self.project(item)
        for row in self.session.scalars(select(Project).where(
                Project.managed_declaratively.is_(True), Project.enabled.is_(True))):
            if row.name not in names:
                row.enabled = False
                self.note("disabled", f"project:{row.name}")
        self.session.flush()

    def project(self, item: DeclarativeProject) -> None:
        target = f"project:{item.name}"
        values = {"description": item.description, "repository_url": item.repository_url,
                  "enabled": item.enabled, "hidden": item.hidden,
                  "cache_enabled": item.cache_enabled,
                  "owner_id": self.user_id(item.owner, f"projects.{item.name}.owner")}
        check_server_path(self.actor, localsource.repository_path(item.repository_url),
                          item.repository_url, self.settings.evaluator.allowed_path_inputs,
                          f"projects.{item.name}.repository_url")
        project = self.session.scalar(select(Project).where(Project.name == item.name))
        if project is None:
            project = Project(name=item.name, managed_declaratively=True, **values)
            self.session.add(project)
            self.session.flush()
            self.note("created", target)
        else:
            self.changed(target, project, {**values, "managed_declaratively": True})
        jobsets = self.jobsets(project, item)
        self.channels(project, item, jobsets)
        self.members(project, item)
        self.webhooks(project, item)
        self.notifications(project, item)

    def jobsets(self, project: Project, item: DeclarativeProject) -> dict[str, Jobset]:
        found: dict[str, Jobset] = {}
        for spec in item.jobsets:
            target = f"jobset:{project.name}/{spec.name}"
            values = spec.model_dump(exclude={"name", "inputs"})
            jobset = self.session.scalar(select(Jobset).where(
                Jobset.project_id == project.id, Jobset.name == spec.name))
            if jobset is None:
                jobset = Jobset(project_id=project.id, name=spec.name,
                                managed_declaratively=True, **values)
                self.session.add(jobset)
                self.session.flush()
                self.note("created", target)
            else:
                self.changed(target, jobset, {**values, "managed_declaratively": True})
            found[spec.name] = jobset
            self.inputs(jobset, target, spec.inputs)
        for jobset in self.session.scalars(select(Jobset).where(
                Jobset.project_id == project.id, Jobset.managed_declaratively.is_(True),
                Jobset.state != JobsetState.disabled)):
            if jobset.name not in found:
                jobset.state = JobsetState.disabled
                self.note("disabled", f"jobset:{project.name}/{jobset.name}")
        return found

    def inputs(self, jobset: Jobset, target: str, declared: list[Any]) -> None:
        """A managed jobset's inputs are exactly the declared ones."""
        existing = {i.name: i for i in self.session.scalars(
            select(JobsetInput).where(JobsetInput.jobset_id == jobset.id))}
        for spec in declared:
            kind = InputType(spec.type)
            path = (spec.value if kind is InputType.path
                    else localsource.git_input_path(spec.value) if kind is InputType.git
                    else None)
            check_server_path(self.actor, path, spec.value,
                              self.settings.evaluator.allowed_path_inputs,
                              f"{target}/input:{spec.name}.value")
            row = existing.pop(spec.name, None)
            if row is None:
                self.session.add(JobsetInput(jobset_id=jobset.id, name=spec.name,
                                             input_type=spec.type, value=spec.value))
                self.note("created", f"{target}/input:{spec.name}")
            else:
                self.changed(f"{target}/input:{spec.name}", row,
                             {"input_type": spec.type, "value": spec.value})
        for row in existing.values():
            self.session.delete(row)
            self.note("removed", f"{target}/input:{row.name}")

    def channels(self, project: Project, item: DeclarativeProject,
                 jobsets: dict[str, Jobset]) -> None:
        names = set()
        for spec in item.channels:
            names.add(spec.name)
            jobset_id = jobsets[spec.jobset].id
            row = self.session.scalar(select(Channel).where(Channel.name == spec.name))
            if row is None:
                service.create_channel(self.session, self.actor, jobsets[spec.jobset],
                                       name=spec.name, mode=spec.mode,
                                       aggregate_job=spec.aggregate_job, managed=True)
                self.note("created", f"channel:{spec.name}")
            elif row.project_id != project.id:
                raise InvalidInput(f"declarative channel {spec.name!r} belongs to another "
                                   f"project")
            else:
                self.changed(f"channel:{spec.name}", row,
                             {"jobset_id": jobset_id, "managed_declaratively": True})
                service.update_channel(self.session, self.actor, row,
                                       {"mode": spec.mode, "aggregate_job": spec.aggregate_job})
        for row in self.session.scalars(select(Channel).where(
                Channel.project_id == project.id, Channel.managed_declaratively.is_(True))):
            if row.name not in names:
                self.session.delete(row)
                self.note("removed", f"channel:{row.name}")

    def members(self, project: Project, item: DeclarativeProject) -> None:
        wanted = {}
        for spec in item.members:
            user_id = self.user_id(spec.username, f"projects.{item.name}.members")
            assert user_id is not None
            wanted[user_id] = spec
        for user_id, spec in wanted.items():
            target = f"project:{project.name}/member:{spec.username}"
            row = self.session.get(ProjectMember, (project.id, user_id))
            if row is None:
                self.session.add(ProjectMember(project_id=project.id, user_id=user_id,
                                               role=spec.role, managed_declaratively=True))
                self.note("created", target, {"role": spec.role.value})
            else:
                self.changed(target, row, {"role": spec.role, "managed_declaratively": True})
        for row in self.session.scalars(select(ProjectMember).where(
                ProjectMember.project_id == project.id,
                ProjectMember.managed_declaratively.is_(True))):
            if row.user_id not in wanted:
                self.session.delete(row)
                self.note("removed", f"project:{project.name}/member:{row.user_id}")

    def webhooks(self, project: Project, item: DeclarativeProject) -> None:
        key = self.settings.server.secret_key or ""
        forges = set()
        for spec in item.webhooks:
            forges.add(spec.forge_type)
            target = f"project:{project.name}/webhook:{spec.forge_type.value}"
            row = self.session.scalar(select(WebhookConfig).where(
                WebhookConfig.project_id == project.id,
                WebhookConfig.forge_type == spec.forge_type))
            if row is None:
                self.session.add(WebhookConfig(
                    project_id=project.id, forge_type=spec.forge_type, enabled=spec.enabled,
                    secret_encrypted=sealing.seal(key, spec.secret) if spec.secret else None,
                    managed_declaratively=True))
                self.note("created", target)
                continue
            self.changed(target, row, {"enabled": spec.enabled, "managed_declaratively": True})
            current = sealing.unseal(key, row.secret_encrypted) if row.secret_encrypted else None
            if current != spec.secret:
                # sealing is randomised: re-seal only when the secret really changed
                row.secret_encrypted = sealing.seal(key, spec.secret) if spec.secret else None
                self.note("updated", target, {"secret": "changed"})
        for row in self.session.scalars(select(WebhookConfig).where(
                WebhookConfig.project_id == project.id,
                WebhookConfig.managed_declaratively.is_(True), WebhookConfig.enabled.is_(True))):
            if row.forge_type not in forges:
                row.enabled = False
                self.note("disabled", f"project:{project.name}/webhook:{row.forge_type.value}")

    def notifications(self, project: Project, item: DeclarativeProject) -> None:
        """Matched by (type, config): an edited entry is a new row, the old one disabled."""
        rows = list(self.session.scalars(select(NotificationConfig).where(
            NotificationConfig.project_id == project.id,
            NotificationConfig.managed_declaratively.is_(True)).order_by(NotificationConfig.id)))
        for spec in item.notifications:
            target = f"project:{project.name}/notification:{spec.type.value}"
            try:
                validate_config(spec.type, spec.config, server_side=True)
            except InvalidInput as exc:
                raise InvalidInput(f"declarative project {project.name!r}: {exc.message}",
                                   exc.details) from None
            match = next((r for r in rows if r.type == spec.type and r.config == spec.config),
                         None)
            if match is None:
                self.session.add(NotificationConfig(
                    project_id=project.id, type=spec.type, config=spec.config,
                    enabled=spec.enabled, managed_declaratively=True))
                self.note("created", target)
            else:
                rows.remove(match)
                self.changed(target, match, {"enabled": spec.enabled})
        for row in rows:
            if row.enabled:
                row.enabled = False
                self.note("disabled", f"project:{project.name}/notification:{row.id}")


def apply_declarative(session: Session, settings: Settings, *, actor: Actor | None = None
                      ) -> dict[str, list[str]]:
    """Bring the database in line with ``settings.declarative`` (caller commits)."""
    declared: DeclarativeSettings = settings.declarative
    session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": LOCK_KEY})
    applier = Applier(session, settings, actor or Actor.system("declarative"))
    applier.users(declared.users)
    applier.api_keys(declared.api_keys)
    applier.builders(declared.remote_builders)
    applier.projects(declared.projects)
    session.flush()
    return applier.summary.as_dict()


def apply_settings(settings: Settings) -> dict[str, list[str]]:
    """Open a connection, apply, commit, close: what ``circus-server`` and ``circus up`` run."""
    from circus.common.db import make_engine, make_session_factory

    engine = make_engine(settings, pool_size=1, application_name="circus-declarative")
    try:
        with make_session_factory(engine).begin() as session:
            summary = apply_declarative(session, settings)
    finally:
        engine.dispose()
    changes = sum(len(v) for v in summary.values())
    log.info("declarative configuration applied: %d change(s)", changes)
    return summary
