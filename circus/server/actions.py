"""User actions shared by the REST API and the dashboard: check, act, audit.

The state changes themselves belong to the services (``queue_runner.service``,
``evaluator.service``); these wrappers add what every web caller must do around
them — the permission check and the audit row — so the API and the dashboard
cannot drift apart. Callers commit.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

from sqlalchemy.orm import Session

from circus import audit
from circus.auth.actor import Actor
from circus.auth.permissions import Action, require_permission
from circus.auth.visibility import require_visible
from circus.common.enums import TriggerKind
from circus.common.errors import InvalidInput, NotFound
from circus.common.models import Build, Evaluation, Jobset, News
from circus.evaluator import service as evaluator
from circus.queue_runner import service as queue_runner


def _build(session: Session, build_id: int) -> Build:
    build = session.get(Build, build_id)
    if build is None:
        raise NotFound(f"no build with id {build_id}")
    return build


class BuildAction(enum.StrEnum):
    cancel = "cancel"
    restart = "restart"
    bump = "bump"
    keep = "keep"
    unkeep = "unkeep"


#: the permission each build action needs
BUILD_PERMISSIONS: dict[BuildAction, Action] = {
    BuildAction.cancel: Action.build_cancel,
    BuildAction.restart: Action.build_restart,
    BuildAction.bump: Action.build_bump,
    BuildAction.keep: Action.build_keep,
    BuildAction.unkeep: Action.build_keep,
}


def act_on_build(session: Session, actor: Actor, build_id: int, action: BuildAction) -> Build:
    build = _build(session, build_id)
    # a hidden project's build does not exist for outsiders, whatever their role
    require_visible(session, actor, build.project_id, f"build with id {build_id}")
    require_permission(session, actor, BUILD_PERMISSIONS[action], build.project_id)
    calls: dict[BuildAction, Callable[[], Build]] = {
        BuildAction.cancel: lambda: queue_runner.cancel_build(
            session, build_id, reason=f"cancelled by {actor.label}"),
        BuildAction.restart: lambda: queue_runner.restart_build(session, build_id),
        BuildAction.bump: lambda: queue_runner.bump_build(session, build_id),
        BuildAction.keep: lambda: queue_runner.set_keep(session, build_id, True),
        BuildAction.unkeep: lambda: queue_runner.set_keep(session, build_id, False),
    }
    result = calls[action]()
    audit.record(session, actor, f"build.{action.value}", f"build:{build_id}")
    return result


def trigger_evaluation(session: Session, actor: Actor, jobset: Jobset
                       ) -> tuple[Evaluation, bool]:
    """Queue an evaluation now (or return the jobset's pending/running one)."""
    # by id or by name: a hidden project's jobset does not exist for outsiders
    require_visible(session, actor, jobset.project_id, f"jobset with id {jobset.id}")
    require_permission(session, actor, Action.evaluation_trigger, jobset.project_id)
    evaluation, created = evaluator.trigger(session, jobset.id, TriggerKind.manual,
                                            requested_by=actor.label)
    session.flush()
    audit.record(session, actor, "evaluation.trigger", f"jobset:{jobset.id}",
                 {"evaluation_id": evaluation.id, "created": created})
    return evaluation, created


def cancel_evaluation(session: Session, actor: Actor, evaluation_id: int) -> Evaluation:
    evaluation = session.get(Evaluation, evaluation_id)
    if evaluation is None:
        raise NotFound(f"no evaluation with id {evaluation_id}")
    require_visible(session, actor, evaluation.jobset.project_id,
                    f"evaluation with id {evaluation_id}")
    require_permission(session, actor, Action.evaluation_cancel, evaluation.jobset.project_id)
    evaluation = evaluator.cancel_evaluation(session, evaluation_id)
    audit.record(session, actor, "evaluation.cancel", f"evaluation:{evaluation_id}")
    return evaluation


def create_news(session: Session, actor: Actor, *, title: str, contents: str) -> News:
    require_permission(session, actor, Action.news_manage)
    if not contents.strip():
        raise InvalidInput("news needs contents", {"contents": ["must not be empty"]})
    item = News(title=title, contents=contents, author_id=actor.user_id)
    session.add(item)
    session.flush()
    audit.record(session, actor, "news.create", f"news:{item.id}", {"title": item.title})
    return item


def delete_news(session: Session, actor: Actor, news_id: int) -> None:
    require_permission(session, actor, Action.news_manage)
    item = session.get(News, news_id)
    if item is None:
        raise NotFound(f"no news item {news_id}")
    session.delete(item)
    audit.record(session, actor, "news.delete", f"news:{news_id}")
