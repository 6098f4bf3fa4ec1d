"""Apply ``[declarative]``: upsert users, API keys, builders and projects at start.

Every object is written through the same service functions as the API (and so
with the same validators and permission checks), as a system actor, which also
records the audit rows. A declared object a service refuses is a config problem
at its key path (``declarative.projects[2].name: ...``); every object is tried,
every problem is reported together, and then nothing is applied (the caller's
transaction rolls back).

Idempotent: applying the same settings twice changes nothing the second time
(no UPDATE, no audit row). Objects it creates are marked
``managed_declaratively``; a managed object that disappears from the file is
disabled (users, builders, projects, jobsets, webhooks, notifications) or
revoked (API keys) rather than deleted, so its history stays. Channels, inputs
and memberships hold no history and are removed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy import inspect, select, text
from sqlalchemy.orm import Session

from circus.auth import passwords
from circus.auth import service as auth
from circus.auth.actor import Actor
from circus.common.config import (
    ConfigError,
    DeclarativeApiKey,
    DeclarativeBuilder,
    DeclarativeChannel,
    DeclarativeJobset,
    DeclarativeMember,
    DeclarativeNotification,
    DeclarativeProject,
    DeclarativeSettings,
    DeclarativeUser,
    DeclarativeWebhook,
    Settings,
)
from circus.common.configbase import Problem
from circus.common.enums import JobsetState
from circus.common.errors import CircusError, InvalidInput
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
from circus.machines import service as machines
from circus.notifications.service import validate_config
from circus.projects import service

log = logging.getLogger(__name__)

T = TypeVar("T")

#: serialises concurrent appliers (two servers starting at once)
LOCK_KEY = 0x43697263  # "Circ"
#: the config section every problem's key path starts with
SECTION = "declarative"
#: the services' field names that the declarative keys spell differently
DECLARED_KEYS = {"owner_id": "owner", "input_type": "type", "user_id": "username",
                 "jobset_id": "jobset"}


@dataclass
class Summary:
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    disabled: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, list[str]]:
        return {"created": self.created, "updated": self.updated, "disabled": self.disabled,
                "removed": self.removed}


def problems_of(error: CircusError, path: str) -> list[Problem]:
    """A service's refusal as config problems: one per message of each named field."""
    details = error.details
    if isinstance(details, Mapping) and details and all(
            isinstance(messages, list) for messages in details.values()):
        return [Problem(f"{path}.{DECLARED_KEYS.get(str(key), key)}", str(message))
                for key, messages in details.items() for message in messages]
    return [Problem(path, error.message)]


def _columns(row: Any) -> dict[str, Any]:
    return {column.key: getattr(row, column.key) for column in inspect(row).mapper.column_attrs}


class Applier:
    def __init__(self, session: Session, settings: Settings, actor: Actor) -> None:
        self.session = session
        self.settings = settings
        self.actor = actor
        self.summary = Summary()
        self.problems: list[Problem] = []

    def attempt(self, path: str, work: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
        """Apply one declared object in a savepoint; a refusal is a problem at ``path``
        (and ``None``: the object's parts are skipped, their problems would only echo it)."""
        try:
            with self.session.begin_nested():
                return work(*args, **kwargs)
        except CircusError as error:
            self.problems += problems_of(error, f"{SECTION}.{path}")
            return None

    def update(self, target: str, row: T, write: Callable[..., Any], *args: Any,
               **kwargs: Any) -> T:
        """Call a service's update of ``row``; listed as updated when a column changed."""
        before = _columns(row)
        write(*args, **kwargs)
        if _columns(row) != before:
            self.summary.updated.append(target)
        return row

    def user_id(self, username: str | None, key: str) -> int | None:
        if username is None:
            return None
        user_id = self.session.scalar(select(User.id).where(User.username == username))
        if user_id is None:
            raise InvalidInput(f"no user {username!r}", {key: [f"no user {username!r}"]})
        return user_id

    # -- users -------------------------------------------------------------

    def users(self, declared: list[DeclarativeUser]) -> None:
        for i, item in enumerate(declared):
            self.attempt(f"users[{i}]", self.user, item)
        names = {u.username for u in declared}
        for user in self.session.scalars(select(User).where(
                User.managed_declaratively.is_(True), User.enabled.is_(True))):
            if user.username not in names:
                auth.update_user(self.session, self.actor, user.id, {"enabled": False})
                self.summary.disabled.append(f"user:{user.username}")

    def user(self, item: DeclarativeUser) -> None:
        target = f"user:{item.username}"
        user = auth.find_user(self.session, item.username)
        if user is None:
            auth.create_user(self.session, self.actor, username=item.username,
                             password=item.password, email=item.email,
                             full_name=item.full_name, role=item.role, enabled=item.enabled,
                             managed=True)
            self.summary.created.append(target)
            return
        changes: dict[str, Any] = {"email": item.email, "full_name": item.full_name,
                                   "role": item.role, "enabled": item.enabled}
        if item.password and not passwords.verify_password(user.password_hash, item.password):
            changes["password"] = item.password
        self.update(target, user, auth.update_user, self.session, self.actor, user.id, changes,
                    managed=True)

    # -- API keys ------------------------------------------------------------

    def api_keys(self, declared: list[DeclarativeApiKey]) -> None:
        for i, item in enumerate(declared):
            self.attempt(f"api_keys[{i}]", self.api_key, item)
        names = {k.name for k in declared}
        for key in self.session.scalars(select(ApiKey).where(
                ApiKey.managed_declaratively.is_(True), ApiKey.revoked_at.is_(None))):
            if key.name not in names:
                auth.revoke_api_key(self.session, self.actor, key.id)
                self.summary.disabled.append(f"api_key:{key.name}")

    def api_key(self, item: DeclarativeApiKey) -> None:
        target = f"api_key:{item.name}"
        owner_id = self.user_id(item.owner, "owner")
        key = self.session.scalar(select(ApiKey).where(
            ApiKey.name == item.name, ApiKey.managed_declaratively.is_(True)))
        if key is None:
            auth.create_api_key(self.session, self.actor, name=item.name, role=item.role,
                                owner_id=owner_id, secret=item.key, managed=True)
            self.summary.created.append(target)
            return
        self.update(target, key, auth.update_api_key, self.session, self.actor, key,
                    secret=item.key, role=item.role, owner_id=owner_id, managed=True)

    # -- remote builders -----------------------------------------------------

    def builders(self, declared: list[DeclarativeBuilder]) -> None:
        for i, item in enumerate(declared):
            self.attempt(f"remote_builders[{i}]", self.builder, item)
        names = {b.name for b in declared}
        for row in self.session.scalars(select(RemoteBuilder).where(
                RemoteBuilder.managed_declaratively.is_(True), RemoteBuilder.enabled.is_(True))):
            if row.name not in names:
                machines.update_builder(self.session, self.actor, row, {"enabled": False})
                self.summary.disabled.append(f"builder:{row.name}")

    def builder(self, item: DeclarativeBuilder) -> None:
        target = f"builder:{item.name}"
        values = item.model_dump(exclude={"name"})
        row = self.session.scalar(select(RemoteBuilder).where(RemoteBuilder.name == item.name))
        if row is None:
            machines.create_builder(self.session, self.actor, name=item.name, managed=True,
                                    **values)
            self.summary.created.append(target)
            return
        self.update(target, row, machines.update_builder, self.session, self.actor, row,
                    values, managed=True)

    # -- projects ------------------------------------------------------------

    def projects(self, declared: list[DeclarativeProject]) -> None:
        for i, item in enumerate(declared):
            path = f"projects[{i}]"
            project = self.attempt(path, self.project, item)
            if project is not None:
                self.project_parts(path, project, item)
        names = {p.name for p in declared}
        for row in self.session.scalars(select(Project).where(
                Project.managed_declaratively.is_(True), Project.enabled.is_(True))):
            if row.name not in names:
                service.update_project(self.session, self.actor, row, {"enabled": False})
                self.summary.disabled.append(f"project:{row.name}")

    def project(self, item: DeclarativeProject) -> Project:
        target = f"project:{item.name}"
        values: dict[str, Any] = {
            "description": item.description, "repository_url": item.repository_url,
            "enabled": item.enabled, "hidden": item.hidden, "cache_enabled": item.cache_enabled,
            "owner_id": self.user_id(item.owner, "owner")}
        checks: dict[str, Any] = {"allowed_schemes": self.settings.server.allowed_url_schemes,
                  "allowed_paths": self.settings.evaluator.allowed_path_inputs}
        project = self.session.scalar(select(Project).where(Project.name == item.name))
        if project is None:
            project = service.create_project(self.session, self.actor, name=item.name,
                                             managed=True, **values, **checks)
            self.summary.created.append(target)
            return project
        return self.update(target, project, service.update_project, self.session, self.actor,
                           project, values, managed=True, **checks)

    def project_parts(self, path: str, project: Project, item: DeclarativeProject) -> None:
        jobsets = self.jobsets(path, project, item.jobsets)
        self.channels(path, project, item.channels, jobsets)
        self.members(path, project, item.members)
        self.webhooks(path, project, item.webhooks)
        self.notifications(path, project, item.notifications)

    def jobsets(self, path: str, project: Project, declared: list[DeclarativeJobset]
                ) -> dict[str, Jobset]:
        found: dict[str, Jobset] = {}
        for j, spec in enumerate(declared):
            jobset = self.attempt(f"{path}.jobsets[{j}]", self.jobset, project, spec)
            if jobset is not None:
                found[spec.name] = jobset
                self.inputs(f"{path}.jobsets[{j}]", project, jobset, spec)
        names = {j.name for j in declared}
        for jobset in self.session.scalars(select(Jobset).where(
                Jobset.project_id == project.id, Jobset.managed_declaratively.is_(True),
                Jobset.state != JobsetState.disabled)):
            if jobset.name not in names:
                service.update_jobset(self.session, self.actor, jobset,
                                      {"state": JobsetState.disabled})
                self.summary.disabled.append(f"jobset:{project.name}/{jobset.name}")
        return found

    def jobset(self, project: Project, spec: DeclarativeJobset) -> Jobset:
        target = f"jobset:{project.name}/{spec.name}"
        values = spec.model_dump(exclude={"name", "inputs"})
        jobset = self.session.scalar(select(Jobset).where(
            Jobset.project_id == project.id, Jobset.name == spec.name))
        if jobset is None:
            jobset = service.create_jobset(self.session, self.actor, project, name=spec.name,
                                           managed=True, **values)
            self.summary.created.append(target)
            return jobset
        return self.update(target, jobset, service.update_jobset, self.session, self.actor,
                           jobset, values, managed=True)

    def inputs(self, path: str, project: Project, jobset: Jobset, spec: DeclarativeJobset
               ) -> None:
        """A managed jobset's inputs are exactly the declared ones."""
        target = f"jobset:{project.name}/{jobset.name}"
        existing = {i.name: i for i in self.session.scalars(
            select(JobsetInput).where(JobsetInput.jobset_id == jobset.id))}
        allowed = self.settings.evaluator.allowed_path_inputs
        for k, item in enumerate(spec.inputs):
            row = existing.pop(item.name, None)
            if row is None:
                if self.attempt(f"{path}.inputs[{k}]", service.add_input, self.session,
                                self.actor, jobset, name=item.name, input_type=item.type,
                                value=item.value, allowed_paths=allowed) is not None:
                    self.summary.created.append(f"{target}/input:{item.name}")
            else:
                self.attempt(f"{path}.inputs[{k}]", self.update, f"{target}/input:{item.name}",
                             row, service.update_input, self.session, self.actor, jobset, row,
                             input_type=item.type, value=item.value, allowed_paths=allowed)
        for row in existing.values():
            service.delete_input(self.session, self.actor, jobset, row.name)
            self.summary.removed.append(f"{target}/input:{row.name}")

    def channels(self, path: str, project: Project, declared: list[DeclarativeChannel],
                 jobsets: dict[str, Jobset]) -> None:
        for j, spec in enumerate(declared):
            jobset = jobsets.get(spec.jobset)
            if jobset is not None:  # else the jobset's own problem is reported
                self.attempt(f"{path}.channels[{j}]", self.channel, project, spec, jobset)
        names = {c.name for c in declared}
        for row in self.session.scalars(select(Channel).where(
                Channel.project_id == project.id, Channel.managed_declaratively.is_(True))):
            if row.name not in names:
                service.delete_channel(self.session, self.actor, row)
                self.summary.removed.append(f"channel:{row.name}")

    def channel(self, project: Project, spec: DeclarativeChannel, jobset: Jobset) -> None:
        target = f"channel:{spec.name}"
        row = self.session.scalar(select(Channel).where(Channel.name == spec.name))
        if row is None:
            service.create_channel(self.session, self.actor, jobset, name=spec.name,
                                   mode=spec.mode, aggregate_job=spec.aggregate_job,
                                   managed=True)
            self.summary.created.append(target)
        elif row.project_id != project.id:
            raise InvalidInput(f"channel {spec.name!r} belongs to another project",
                               {"name": ["channel names are global: this one belongs to "
                                         "another project"]})
        else:
            self.update(target, row, service.update_channel, self.session, self.actor, row,
                        {"mode": spec.mode, "aggregate_job": spec.aggregate_job},
                        jobset=jobset, managed=True)

    def members(self, path: str, project: Project, declared: list[DeclarativeMember]) -> None:
        wanted: set[int] = set()
        for j, spec in enumerate(declared):
            user_id = self.attempt(f"{path}.members[{j}]", self.member, project, spec)
            if user_id is not None:
                wanted.add(user_id)
        for row in self.session.scalars(select(ProjectMember).where(
                ProjectMember.project_id == project.id,
                ProjectMember.managed_declaratively.is_(True))):
            if row.user_id not in wanted:
                service.remove_member(self.session, self.actor, project, row.user_id)
                self.summary.removed.append(f"project:{project.name}/member:{row.user_id}")

    def member(self, project: Project, spec: DeclarativeMember) -> int:
        target = f"project:{project.name}/member:{spec.username}"
        user_id = self.user_id(spec.username, "username")
        assert user_id is not None
        row = self.session.get(ProjectMember, (project.id, user_id))
        if row is None:
            service.set_member(self.session, self.actor, project, role=spec.role,
                               user_id=user_id, managed=True)
            self.summary.created.append(target)
        else:
            self.update(target, row, service.set_member, self.session, self.actor, project,
                        role=spec.role, user_id=user_id, managed=True)
        return user_id

    def webhooks(self, path: str, project: Project, declared: list[DeclarativeWebhook]
                 ) -> None:
        for j, spec in enumerate(declared):
            self.attempt(f"{path}.webhooks[{j}]", self.webhook, project, spec)
        forges = {w.forge_type for w in declared}
        for row in self.session.scalars(select(WebhookConfig).where(
                WebhookConfig.project_id == project.id,
                WebhookConfig.managed_declaratively.is_(True), WebhookConfig.enabled.is_(True))):
            if row.forge_type not in forges:
                service.update_webhook(self.session, self.actor, project, row,
                                       {"enabled": False}, server_key=self.server_key)
                self.summary.disabled.append(
                    f"project:{project.name}/webhook:{row.forge_type.value}")

    @property
    def server_key(self) -> str:
        return self.settings.server.secret_key or ""

    def webhook(self, project: Project, spec: DeclarativeWebhook) -> None:
        target = f"project:{project.name}/webhook:{spec.forge_type.value}"
        row = self.session.scalar(select(WebhookConfig).where(
            WebhookConfig.project_id == project.id,
            WebhookConfig.forge_type == spec.forge_type))
        if row is None:
            service.create_webhook(self.session, self.actor, project,
                                   forge_type=spec.forge_type, secret=spec.secret,
                                   server_key=self.server_key, enabled=spec.enabled,
                                   managed=True)
            self.summary.created.append(target)
            return
        self.update(target, row, service.update_webhook, self.session, self.actor, project, row,
                    {"enabled": spec.enabled, "secret": spec.secret},
                    server_key=self.server_key, managed=True)

    def notifications(self, path: str, project: Project,
                      declared: list[DeclarativeNotification]) -> None:
        """Matched by (type, config): an edited entry is a new row, the old one disabled."""
        rows = list(self.session.scalars(select(NotificationConfig).where(
            NotificationConfig.project_id == project.id,
            NotificationConfig.managed_declaratively.is_(True)).order_by(NotificationConfig.id)))
        for j, spec in enumerate(declared):
            match = next((r for r in rows if r.type == spec.type and r.config == spec.config),
                         None)
            if match is not None:
                rows.remove(match)
            self.attempt(f"{path}.notifications[{j}]", self.notification, project, spec, match)
        for row in rows:
            if row.enabled:
                service.update_notification(self.session, self.actor, project, row,
                                            enabled=False)
                self.summary.disabled.append(f"project:{project.name}/notification:{row.id}")

    def notification(self, project: Project, spec: DeclarativeNotification,
                     match: NotificationConfig | None) -> None:
        target = f"project:{project.name}/notification:{spec.type.value}"
        if match is None:
            service.create_notification(self.session, self.actor, project, type=spec.type,
                                        config=spec.config, enabled=spec.enabled, managed=True)
            self.summary.created.append(target)
            return
        # a kept config is checked again: the rules may have tightened since it was written
        validate_config(spec.type, spec.config, server_side=True)
        self.update(target, match, service.update_notification, self.session, self.actor,
                    project, match, enabled=spec.enabled)


def apply_declarative(session: Session, settings: Settings, *, actor: Actor | None = None
                      ) -> dict[str, list[str]]:
    """Bring the database in line with ``settings.declarative`` (caller commits).

    ``ConfigError`` lists every declared object the services refused; the caller must
    then roll back (nothing of the file is applied).
    """
    declared: DeclarativeSettings = settings.declarative
    session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": LOCK_KEY})
    applier = Applier(session, settings, actor or Actor.system("declarative"))
    applier.users(declared.users)
    applier.api_keys(declared.api_keys)
    applier.builders(declared.remote_builders)
    applier.projects(declared.projects)
    if applier.problems:
        raise ConfigError(applier.problems)
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
