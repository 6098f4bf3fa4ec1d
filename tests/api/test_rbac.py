"""The RBAC matrix: every role x every mutation is allowed or 403 (anonymous: 401).

Each mutation runs inside a savepoint that is rolled back, so one world serves
every request. "Allowed" means the permission check passed: the answer is
neither 401 nor 403 (it may still be a 409 or a validation error).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy.orm import Session

from circus.common.enums import (
    BuildStatus,
    EvaluationStatus,
    ForgeType,
    InputType,
    MemberRole,
    NotificationTaskStatus,
    NotificationType,
    Role,
)
from circus.common.models import (
    Channel,
    JobsetInput,
    News,
    NotificationConfig,
    NotificationTask,
    ProjectMember,
    RemoteBuilder,
    WebhookConfig,
)
from tests.api.conftest import Keys, World

ADMIN, CREATE, RESTART, CANCEL, BUMP, EVAL, READ = (
    Role.admin, Role.create_projects, Role.restart_jobs, Role.cancel_build,
    Role.bump_to_front, Role.eval_jobset, Role.read_only)
MEMBER, MAINTAINER, PADMIN = MemberRole.member, MemberRole.maintainer, MemberRole.admin
ALL_MEMBERS = {MEMBER, MAINTAINER, PADMIN}
MANAGERS = {MAINTAINER, PADMIN}


@dataclass(frozen=True)
class Mutation:
    name: str
    method: str
    path: str
    body: dict[str, Any] | None
    roles: frozenset[Role]
    members: frozenset[MemberRole] = frozenset()


def m(name: str, method: str, path: str, body: dict[str, Any] | None, roles: set[Role],
      members: set[MemberRole] | None = None) -> Mutation:
    return Mutation(name, method, path, body, frozenset(roles | {ADMIN}),
                    frozenset(members or set()))


P = "/api/v1/projects/proj"
MUTATIONS = [
    m("project.create", "POST", "/api/v1/projects", {"name": "newp"}, {CREATE}),
    m("project.update", "PUT", P, {"description": "x"}, set(), MANAGERS),
    m("project.delete", "DELETE", P, None, set(), {PADMIN}),
    m("jobset.create", "POST", P + "/jobsets", {"name": "new"}, set(), MANAGERS),
    m("jobset.update", "PUT", P + "/jobsets/main", {"keep_nr": 1}, set(), MANAGERS),
    m("jobset.delete", "DELETE", P + "/jobsets/main", None, set(), MANAGERS),
    m("input.create", "POST", P + "/jobsets/main/inputs",
      {"name": "n", "input_type": "string", "value": "v"}, set(), MANAGERS),
    m("input.delete", "DELETE", P + "/jobsets/main/inputs/src", None, set(), MANAGERS),
    m("webhook.create", "POST", P + "/webhooks", {"forge_type": "gitlab"}, set(), MANAGERS),
    m("webhook.delete", "DELETE", P + "/webhooks/{webhook}", None, set(), MANAGERS),
    m("notification.create", "POST", P + "/notifications", {"type": "slack"}, set(),
      MANAGERS),
    m("notification.delete", "DELETE", P + "/notifications/{notification}", None, set(),
      MANAGERS),
    m("member.set", "POST", P + "/members", {"username": "target"}, set(), {PADMIN}),
    m("member.remove", "DELETE", P + "/members/{target}", None, set(), {PADMIN}),
    m("channel.create", "POST", "/api/v1/channels", {"name": "c2", "jobset_id": "{jobset}"},
      set(), MANAGERS),
    m("channel.delete", "DELETE", "/api/v1/channels/chan", None, set(), MANAGERS),
    m("channel.promote", "POST", "/api/v1/channels/chan/promote/{evaluation}", None, set(),
      MANAGERS),
    m("evaluation.trigger", "POST", "/api/v1/evaluations/trigger", {"jobset_id": "{jobset}"},
      {EVAL}, ALL_MEMBERS),
    m("evaluation.cancel", "POST", "/api/v1/evaluations/{running_eval}/cancel", None, {CANCEL},
      MANAGERS),
    m("build.cancel", "POST", "/api/v1/builds/{pending}/cancel", None, {CANCEL}, ALL_MEMBERS),
    m("build.restart", "POST", "/api/v1/builds/{failed}/restart", None, {RESTART},
      ALL_MEMBERS),
    m("build.bump", "POST", "/api/v1/builds/{pending}/bump", None, {BUMP}, ALL_MEMBERS),
    m("build.keep", "PUT", "/api/v1/builds/{failed}/keep/true", None, {RESTART}, ALL_MEMBERS),
    m("user.create", "POST", "/api/v1/users", {"username": "newbie"}, set()),
    m("user.update", "PUT", "/api/v1/users/{target}", {"full_name": "T"}, set()),
    m("user.delete", "DELETE", "/api/v1/users/{target}", None, set()),
    m("builder.create", "POST", "/api/v1/admin/builders",
      {"name": "b2", "ssh_uri": "ssh://b2"}, set()),
    m("builder.update", "PUT", "/api/v1/admin/builders/{builder}", {"max_jobs": 2}, set()),
    m("builder.delete", "DELETE", "/api/v1/admin/builders/{builder}", None, set()),
    m("notification_task.retry", "POST", "/api/v1/admin/notification-tasks/{task}/retry", None,
      set()),
    m("config.update", "PUT", "/api/v1/admin/config", {"toml": ""}, set()),
    m("news.create", "POST", "/api/v1/news", {"contents": "hello"}, set()),
    m("news.delete", "DELETE", "/api/v1/news/{news}", None, set()),
]


@pytest.fixture
def ids(db: Session, world: World, keys: Keys) -> dict[str, int]:
    project = world.project()
    jobset = world.jobset(project)
    done = world.evaluation(jobset)
    running = world.evaluation(world.jobset(project, "other"), EvaluationStatus.running)
    pending = world.build(done, "a")
    failed = world.build(done, "b", BuildStatus.failed)
    target = keys.user("target")
    rows: list[Any] = [
        JobsetInput(jobset_id=jobset.id, name="src", input_type=InputType.string, value="v"),
        WebhookConfig(project_id=project.id, forge_type=ForgeType.github),
        NotificationConfig(project_id=project.id, type=NotificationType.webhook, config={}),
        Channel(project_id=project.id, jobset_id=jobset.id, name="chan"),
        RemoteBuilder(name="b1", ssh_uri="ssh://b1", systems=["x86_64-linux"]),
        NotificationTask(type=NotificationType.webhook, payload={},
                         status=NotificationTaskStatus.failed),
        News(contents="old"),
        ProjectMember(project_id=project.id, user_id=target.id, role=MEMBER),
    ]
    db.add_all(rows)
    db.commit()
    return {"project": project.id, "jobset": jobset.id, "evaluation": done.id,
            "running_eval": running.id, "pending": pending.id, "failed": failed.id,
            "target": target.id, "webhook": rows[1].id, "notification": rows[2].id,
            "builder": rows[4].id, "task": rows[5].id, "news": rows[6].id}


def fill(value: Any, ids: dict[str, int]) -> Any:
    if isinstance(value, str) and value.startswith("{") and value.endswith("}"):
        return ids[value[1:-1]]
    if isinstance(value, dict):
        return {k: fill(v, ids) for k, v in value.items()}
    return value


def attempt(client: FlaskClient, db: Session, mutation: Mutation, ids: dict[str, int],
            headers: dict[str, str]) -> int:
    # a connection-level savepoint is emitted at once (the Session's would be lazy)
    connection = db.connection()
    savepoint = connection.begin_nested()
    try:
        response = client.open(mutation.path.format(**ids), method=mutation.method,
                               json=fill(mutation.body, ids), headers=headers)
        return response.status_code
    finally:
        savepoint.rollback()
        db.expire_all()


def check(client: FlaskClient, db: Session, ids: dict[str, int], headers: dict[str, str],
          allowed: Any) -> None:
    wrong = []
    for mutation in MUTATIONS:
        status = attempt(client, db, mutation, ids, headers)
        expect_allowed = allowed(mutation)
        if (expect_allowed and status in (401, 403)) or (not expect_allowed and status != 403):
            wrong.append((mutation.name, status, "allowed" if expect_allowed else "403"))
    assert wrong == []


@pytest.mark.parametrize("role", list(Role))
def test_global_role_matrix(role: Role, client: FlaskClient, db: Session, keys: Keys,
                            ids: dict[str, int]) -> None:
    headers = keys.headers(role)
    check(client, db, ids, headers, lambda mutation: role in mutation.roles)


@pytest.mark.parametrize("member_role", list(MemberRole))
def test_project_member_matrix(member_role: MemberRole, client: FlaskClient, db: Session,
                               keys: Keys, ids: dict[str, int]) -> None:
    """A read-only user's key acts with the user's membership in ``proj``."""
    user = keys.user("member")
    db.add(ProjectMember(project_id=ids["project"], user_id=user.id, role=member_role))
    db.commit()
    headers = keys.headers(Role.read_only, owner=user)
    check(client, db, ids, headers, lambda mutation: member_role in mutation.members)


def test_anonymous_mutations_are_401(client: FlaskClient, db: Session, ids: dict[str, int]
                                     ) -> None:
    statuses = {mutation.name: attempt(client, db, mutation, ids, {}) for mutation in MUTATIONS}
    assert {name for name, status in statuses.items() if status != 401} == set()
