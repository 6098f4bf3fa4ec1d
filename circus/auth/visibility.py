"""Who may see what: hidden projects are readable only by admins and their members.

One rule for the API, the dashboard and search: a hidden project, and everything
under it (jobsets, evaluations, builds, logs, products, channels), exists only for
admins, the project's owner and its members; everyone else gets a 404 on lookups
and never sees its rows in lists. Hidden projects are rare, so lists exclude the
few ids the actor may not see (``NOT IN`` over a small set) instead of joining
every row to its project.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from circus.auth.actor import Actor
from circus.common.errors import NotFound
from circus.common.models import Project, ProjectMember


def hidden_project_ids(actor: Actor) -> Any | None:
    """A subquery of the project ids ``actor`` may not see, or ``None`` when it sees all."""
    if actor.is_admin:
        return None
    query = select(Project.id).where(Project.hidden.is_(True))
    if actor.user_id is not None:
        member_of = select(ProjectMember.project_id).where(
            ProjectMember.user_id == actor.user_id)
        query = query.where(Project.id.not_in(member_of),
                            or_(Project.owner_id.is_(None), Project.owner_id != actor.user_id))
    return query


def only_visible(query: Any, project_id_column: Any, actor: Actor) -> Any:
    """``query`` without rows whose ``project_id_column`` names a project hidden from
    ``actor``."""
    hidden = hidden_project_ids(actor)
    return query if hidden is None else query.where(project_id_column.not_in(hidden))


def can_see_project(session: Session, actor: Actor, project_id: int) -> bool:
    hidden = hidden_project_ids(actor)
    if hidden is None:
        return True
    return session.scalar(hidden.where(Project.id == project_id)) is None


def require_visible(session: Session, actor: Actor, project_id: int, what: str) -> None:
    """A 404 (``what`` names the missing object) unless ``actor`` may see the project."""
    if not can_see_project(session, actor, project_id):
        raise NotFound(f"no {what}")
