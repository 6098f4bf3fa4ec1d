"""Hidden projects: readable by admins, their owner and members; a 404 for everyone else.

Every read path is checked for each kind of caller, so a new endpoint that forgets
the rule is caught by the lists here rather than by a user.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
from flask.testing import FlaskClient
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from circus.common.config import Settings
from circus.common.enums import BuildStatus, MemberRole, Role
from circus.common.models import Channel, ProjectMember
from circus.common.models.base import utcnow
from tests.api.conftest import Keys, World, make_app


@dataclass
class Secret:
    project: str
    jobset: str
    evaluation_id: int
    build_id: int
    public_build_id: int


@pytest.fixture
def secret(world: World, db: Session) -> Secret:
    hidden = world.project("secret", hidden=True)
    jobset = world.jobset(hidden, "main")
    evaluation = world.evaluation(jobset)
    build = world.build(evaluation, "classified", BuildStatus.succeeded, completed_at=utcnow(),
                        outputs={"out": "/nix/store/" + "s" * 32 + "-classified"})
    db.add(Channel(project_id=hidden.id, jobset_id=jobset.id, name="secret-stable",
                   evaluation_id=evaluation.id))
    public = world.project("open")
    public_build = world.build(world.evaluation(world.jobset(public)), "classified-too")
    db.commit()
    return Secret(hidden.name, jobset.name, evaluation.id, build.id, public_build.id)


def lookups(s: Secret) -> list[str]:
    """Paths that name something inside the hidden project."""
    b, e, p = f"/api/v1/builds/{s.build_id}", f"/api/v1/evaluations/{s.evaluation_id}", \
        f"/api/v1/projects/{s.project}"
    return [p, f"{p}/jobsets", f"{p}/jobsets/{s.jobset}", f"{p}/builds", f"{p}/channels",
            f"{p}/members", b, f"{b}/steps", f"{b}/log", f"{b}/products",
            f"{b}/constituents", f"{b}/dependencies", f"{b}/dependents", e,
            f"{e}/compare?to={s.evaluation_id}", "/api/v1/channels/secret-stable"]


def listed(client: FlaskClient, headers: dict[str, str], s: Secret) -> dict[str, bool]:
    """Whether each list (and search) shows the hidden project's rows."""
    def get(path: str) -> dict:  # type: ignore[type-arg]
        response = client.get(path, headers=headers)
        assert response.status_code == 200, (path, response.json)
        return response.json  # type: ignore[no-any-return]

    search = get("/api/v1/search?q=classified")
    return {
        "projects": any(p["name"] == s.project for p in get("/api/v1/projects")["items"]),
        "builds": any(b["id"] == s.build_id for b in get("/api/v1/builds")["items"]),
        # totals come from rollups (and an evaluation's counts), not the listed rows
        "builds total": get("/api/v1/builds")["total"] == 2,
        "evaluation total": get(f"/api/v1/builds?evaluation_id={s.evaluation_id}")[
            "total"] == 1,
        "status total": get("/api/v1/builds?status=succeeded")["total"] == 1,
        "recent": any(b["id"] == s.build_id for b in get("/api/v1/builds/recent")),
        "stats": get("/api/v1/builds/stats")["total"] == 2,
        "evaluations": any(e["id"] == s.evaluation_id
                           for e in get("/api/v1/evaluations")["items"]),
        "evaluations total": get("/api/v1/evaluations")["total"] == 2,
        "channels": any(c["name"] == "secret-stable" for c in get("/api/v1/channels")["items"]),
        "search jobs": any(j["build_id"] == s.build_id for j in search["jobs"]),
        "search paths": bool(get("/api/v1/search?q=" + "s" * 8)["store_paths"]),
        "search by id": any(b["build_id"] == s.build_id
                            for b in get(f"/api/v1/search?q={s.build_id}")["builds"]),
    }


def test_outsiders_see_nothing_of_a_hidden_project(
        make_settings: Callable[..., Settings], engine: Engine, db: Session, keys: Keys,
        secret: Secret) -> None:
    # anonymous readers too: reads are open in this instance
    client = make_app(make_settings(server={"require_api_key_for_reads": False,
                                            "rate_limit_api": "100000/minute"}),
                      engine, db).test_client()
    for headers in ({}, keys.headers(Role.read_only), keys.headers(Role.restart_jobs)):
        for path in lookups(secret):
            response = client.get(path, headers=headers)
            assert response.status_code == 404, (path, headers, response.status_code)
            assert response.json is not None
            assert "error" in response.json, path
        assert not any(listed(client, headers, secret).values()), headers
        # actions too: a 404, not a 403 that would confirm the build exists
        for action in ("restart", "cancel", "bump"):
            response = client.post(f"/api/v1/builds/{secret.build_id}/{action}",
                                   headers=headers)
            assert response.status_code == 404, (action, headers, response.status_code)
        response = client.post(f"/api/v1/evaluations/{secret.evaluation_id}/cancel",
                               headers=headers)
        assert response.status_code == 404
        # the public project next to it stays visible
        builds = client.get("/api/v1/builds", headers=headers).json["items"]
        assert [b["id"] for b in builds] == [secret.public_build_id]


def test_admins_and_members_see_a_hidden_project(client: FlaskClient, keys: Keys,
                                                 db: Session, world: World,
                                                 secret: Secret) -> None:
    member = keys.user("insider")
    project_id = client.get(f"/api/v1/projects/{secret.project}",
                            headers=keys.headers(Role.admin)).json["id"]
    db.add(ProjectMember(project_id=project_id, user_id=member.id, role=MemberRole.member))
    db.commit()
    for headers in (keys.headers(Role.admin, name="root"),
                    keys.headers(Role.read_only, owner=member, name="insider-key")):
        for path in lookups(secret):
            status = client.get(path, headers=headers).status_code
            # the build has no log or steps of its own: 404 for that reason only
            expected = 404 if path.endswith("/log") else 200
            assert status == expected, (path, status)
        assert all(listed(client, headers, secret).values()), headers


def test_a_hidden_project_owner_sees_it_without_a_member_row(client: FlaskClient, keys: Keys,
                                                             db: Session, secret: Secret
                                                             ) -> None:
    owner = keys.user("owner")
    admin = keys.headers(Role.admin, name="root")
    project = client.get(f"/api/v1/projects/{secret.project}", headers=admin).json
    from circus.common.models import Project

    row = db.get(Project, project["id"])
    assert row is not None
    row.owner_id = owner.id
    db.commit()
    headers = keys.headers(Role.read_only, owner=owner, name="owner-key")
    assert client.get(f"/api/v1/projects/{secret.project}", headers=headers).status_code == 200
    assert listed(client, headers, secret)["builds"]
