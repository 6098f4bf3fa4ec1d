"""Who may do what: global roles, project member roles, and the one check.

Global roles (users and API keys) grant actions everywhere; project member
roles grant actions inside one project. ``admin`` may do everything. An API
key acts with its own role bounded by its owner's current one
(:func:`circus.auth.api_keys.effective_role`) and, unless it is a read-only key
of an owner who has more (``Actor.read_only``), with its owner's project
memberships; such a read-only key changes nothing at all.
"""

from __future__ import annotations

import enum

from sqlalchemy import select
from sqlalchemy.orm import Session

from circus.auth.actor import Actor
from circus.common.enums import MemberRole, Role
from circus.common.errors import PermissionDenied, Unauthenticated
from circus.common.models import Project, ProjectMember


class Action(enum.StrEnum):
    project_create = "project.create"
    project_update = "project.update"
    project_delete = "project.delete"
    #: jobsets, their inputs, channels
    jobset_manage = "jobset.manage"
    #: webhook and notification configs
    hooks_manage = "hooks.manage"
    member_manage = "member.manage"
    evaluation_trigger = "evaluation.trigger"
    evaluation_cancel = "evaluation.cancel"
    build_cancel = "build.cancel"
    build_restart = "build.restart"
    build_bump = "build.bump"
    build_keep = "build.keep"
    user_manage = "user.manage"
    builder_manage = "builder.manage"
    news_manage = "news.manage"
    #: audit log, notification tasks, system info, configuration
    admin_access = "admin.access"


GLOBAL_GRANTS: dict[Role, frozenset[Action]] = {
    Role.admin: frozenset(Action),
    Role.create_projects: frozenset({Action.project_create}),
    Role.restart_jobs: frozenset({Action.build_restart, Action.build_keep}),
    Role.cancel_build: frozenset({Action.build_cancel, Action.evaluation_cancel}),
    Role.bump_to_front: frozenset({Action.build_bump}),
    Role.eval_jobset: frozenset({Action.evaluation_trigger}),
    Role.read_only: frozenset(),
}

_MEMBER = frozenset({Action.evaluation_trigger, Action.build_cancel, Action.build_restart,
                     Action.build_bump, Action.build_keep})
_MAINTAINER = _MEMBER | {Action.project_update, Action.jobset_manage, Action.hooks_manage,
                         Action.evaluation_cancel}
MEMBER_GRANTS: dict[MemberRole, frozenset[Action]] = {
    MemberRole.member: _MEMBER,
    MemberRole.maintainer: frozenset(_MAINTAINER),
    MemberRole.admin: frozenset(_MAINTAINER | {Action.member_manage, Action.project_delete}),
}


def project_role(session: Session, actor: Actor, project_id: int) -> MemberRole | None:
    """The actor's member role in a project (the owner counts as its admin).

    A read-only key has none: its owner's memberships do not come with it.
    """
    if actor.user_id is None or actor.read_only:
        return None
    role = session.scalar(select(ProjectMember.role).where(
        ProjectMember.project_id == project_id, ProjectMember.user_id == actor.user_id))
    if role is not None:
        return role
    owner = session.scalar(select(Project.owner_id).where(Project.id == project_id))
    return MemberRole.admin if owner is not None and owner == actor.user_id else None


def allowed(session: Session, actor: Actor, action: Action, project_id: int | None = None
            ) -> bool:
    if not actor.is_authenticated or actor.read_only:
        return False
    if actor.is_admin:
        return True
    if actor.role is not None and action in GLOBAL_GRANTS[actor.role]:
        return True
    if project_id is not None:
        role = project_role(session, actor, project_id)
        if role is not None and action in MEMBER_GRANTS[role]:
            return True
    return False


def require_permission(session: Session, actor: Actor, action: Action,
                       project_id: int | None = None) -> None:
    """Raise ``Unauthenticated`` (401) or ``PermissionDenied`` (403) unless allowed."""
    if not actor.is_authenticated:
        raise Unauthenticated("authentication required",
                              {"hint": "send Authorization: Bearer <api key> or log in"})
    if not allowed(session, actor, action, project_id):
        raise PermissionDenied(f"{actor.label} may not {action.value}",
                               {"action": action.value, "role": actor.role and actor.role.value,
                                "project_id": project_id})


def require_authenticated(actor: Actor) -> None:
    if not actor.is_authenticated:
        raise Unauthenticated("authentication required",
                              {"hint": "send Authorization: Bearer <api key> or log in"})


def require_writable(actor: Actor) -> None:
    """Refuse every change made with a read-only key (its owner's own account included)."""
    require_authenticated(actor)
    if actor.read_only:
        raise PermissionDenied(f"{actor.label} is a read-only API key",
                               {"hint": "use a key with its owner's role, or log in"})


def allowed_actions(session: Session, actor: Actor, project_id: int | None = None
                    ) -> frozenset[Action]:
    """Everything the actor may do (in a project): one member lookup for a whole page."""
    if not actor.is_authenticated or actor.read_only:
        return frozenset()
    if actor.is_admin:
        return frozenset(Action)
    granted = set(GLOBAL_GRANTS[actor.role]) if actor.role is not None else set()
    if project_id is not None:
        role = project_role(session, actor, project_id)
        if role is not None:
            granted |= MEMBER_GRANTS[role]
    return frozenset(granted)
