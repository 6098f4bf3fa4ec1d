"""Issue 12 §4 — roles mean what they say, attacked over HTTP against a real circus-server.

- a key never does more than its owner may *now* (demotion, disabling: next request);
- a project maintainer cannot hand the project to someone else (``owner_id`` needs
  project admin);
- a read-only key of a more capable owner changes nothing, not even the owner's account;
- a key narrower than its owner cannot set the first password of a password-less
  account (that password would log in as the whole account).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import requests
from sqlalchemy import Engine

from tests.api.live import ADMIN_KEY, LiveServer, live_server

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
PASSWORD = "correct horse battery staple"


@pytest.fixture(scope="module")
def server(engine: Engine, database_url: str, redis_url: str,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with live_server(engine, database_url, redis_url,
                     tmp_path_factory.mktemp("security-roles")) as running:
        yield running


class Api:
    def __init__(self, server: LiveServer) -> None:
        self.url = server.url + "/api/v1"

    def call(self, method: str, path: str, headers: dict[str, str] | None = None,
             **kwargs: Any) -> requests.Response:
        return requests.request(method, self.url + path, headers=headers or ADMIN, timeout=10,
                                **kwargs)

    def user(self, username: str, role: str, password: str | None = None) -> int:
        body: dict[str, Any] = {"username": username, "role": role}
        if password:
            body["password"] = password
        response = self.call("POST", "/users", json=body)
        assert response.status_code == 201, response.text
        return int(response.json()["id"])

    def key(self, owner_id: int, role: str, name: str) -> dict[str, str]:
        response = self.call("POST", "/api-keys",
                             json={"name": name, "role": role, "owner_id": owner_id})
        assert response.status_code == 201, response.text
        return {"Authorization": f"Bearer {response.json()['key']}"}

    def project(self, name: str, **members: str) -> None:
        response = self.call("POST", "/projects", json={"name": name})
        assert response.status_code == 201, response.text
        for username, role in members.items():
            response = self.call("POST", f"/projects/{name}/members",
                                 json={"username": username, "role": role})
            assert response.status_code in (200, 201), response.text


@pytest.fixture(scope="module")
def api(server: LiveServer) -> Api:
    return Api(server)


def test_demoting_or_disabling_the_owner_bounds_its_keys_on_the_next_request(api: Api
                                                                              ) -> None:
    bob = api.user("bob", "create-projects")
    bob_key = api.key(bob, "create-projects", "bob-projects")
    assert api.call("POST", "/projects", bob_key, json={"name": "bobs"}).status_code == 201

    assert api.call("PUT", f"/users/{bob}", json={"role": "read-only"}).status_code == 200
    refused = api.call("POST", "/projects", bob_key, json={"name": "bobs-second"})
    assert refused.status_code == 403
    assert refused.json()["error"] == "key:bob-projects may not project.create"

    # an admin's admin key is an admin key only while its owner is an admin
    ann = api.user("ann", "admin")
    ann_key = api.key(ann, "admin", "ann-admin")
    assert api.call("GET", "/admin/audit-log", ann_key).status_code == 200
    assert api.call("PUT", f"/users/{ann}", json={"role": "eval-jobset"}).status_code == 200
    demoted = api.call("GET", "/admin/audit-log", ann_key)
    assert demoted.status_code == 403
    assert demoted.json()["error"] == "key:ann-admin may not admin.access"

    assert api.call("PUT", f"/users/{bob}", json={"enabled": False}).status_code == 200
    disabled = api.call("GET", "/me", bob_key)
    assert disabled.status_code == 401
    assert disabled.json()["error"] == "invalid or revoked API key"


def test_a_maintainer_cannot_change_the_projects_owner(api: Api) -> None:
    mal = api.user("mal", "read-only")
    pam = api.user("pam", "read-only")
    api.project("shop", mal="maintainer", pam="admin")
    mal_key = api.key(mal, "read-only", "mal-own")  # her own role: acts with her memberships
    # positive control: the maintainer may edit the project
    edited = api.call("PUT", "/projects/shop", mal_key, json={"description": "by mal"})
    assert edited.status_code == 200, edited.text

    takeover = api.call("PUT", "/projects/shop", mal_key, json={"owner_id": mal})
    assert takeover.status_code == 403
    assert takeover.json()["error"] == "key:mal-own may not member.manage"
    assert api.call("GET", "/projects/shop").json()["owner_id"] != mal

    # the project's admin may
    pam_key = api.key(pam, "read-only", "pam-own")
    handed = api.call("PUT", "/projects/shop", pam_key, json={"owner_id": mal})
    assert handed.status_code == 200, handed.text
    assert handed.json()["owner_id"] == mal


def test_a_read_only_key_changes_nothing(api: Api) -> None:
    dave = api.user("dave", "create-projects", password=PASSWORD)
    api.project("dave-proj", dave="maintainer")
    full = api.key(dave, "create-projects", "dave-full")
    read_only = api.key(dave, "read-only", "dave-ro")

    assert api.call("GET", "/projects/dave-proj", read_only).status_code == 200
    attempts = [
        ("PUT", "/projects/dave-proj", {"description": "ro"}),
        ("POST", "/projects", {"name": "ro-project"}),
        ("POST", "/projects/dave-proj/jobsets", {"name": "ro-jobset"}),
        ("POST", "/api-keys", {"name": "ro-child", "role": "read-only"}),
        ("PUT", "/me", {"email": "ro@example.org"}),
        ("POST", "/me/password", {"current_password": PASSWORD,
                                  "new_password": "another long password"}),
    ]
    for method, path, body in attempts:
        response = api.call(method, path, read_only, json=body)
        assert response.status_code == 403, (method, path, response.text)
        assert "read-only" in response.json()["error"] or \
            response.json()["error"].startswith("key:dave-ro may not"), response.text
    assert api.call("PUT", "/me", read_only, json={"email": "x@example.org"}).json()[
        "error"] == "key:dave-ro is a read-only API key"

    # positive control: the same owner's full key may do these
    assert api.call("PUT", "/projects/dave-proj", full,
                    json={"description": "full"}).status_code == 200
    assert api.call("POST", "/projects", full, json={"name": "full-project"}).status_code == 201


def test_a_narrower_key_cannot_set_a_first_password(api: Api, server: LiveServer) -> None:
    erin = api.user("erin", "admin")  # password-less (e.g. made for GitHub/API use)
    narrow = api.key(erin, "eval-jobset", "erin-eval")
    body = {"current_password": "", "new_password": PASSWORD}
    refused = api.call("POST", "/me/password", narrow, json=body)
    assert refused.status_code == 403
    assert refused.json()["error"] == ("key:erin-eval has less than erin's role and cannot "
                                       "set the account's first password")
    login = requests.post(server.url + "/api/v1/auth/login", timeout=10,
                          json={"username": "erin", "password": PASSWORD})
    assert login.status_code == 401

    # a key that can already do everything erin can may set it
    whole = api.key(erin, "admin", "erin-admin")
    assert api.call("POST", "/me/password", whole, json=body).status_code == 204
    assert requests.post(server.url + "/api/v1/auth/login", timeout=10,
                         json={"username": "erin", "password": PASSWORD}).status_code == 200


def test_a_key_without_an_owner_touches_no_other_key(api: Api) -> None:
    """Admins make keys without an owner (a CI robot, a dashboard screen). One that is
    not an admin key must not read or revoke other ownerless keys: an ownerless
    read-only key revoked the robot's admin key (both owners are None, so they matched
    as 'its own')."""
    def ownerless(name: str, role: str) -> tuple[int, dict[str, str]]:
        response = api.call("POST", "/api-keys", json={"name": name, "role": role})
        assert response.status_code == 201, response.text
        assert response.json()["owner_id"] is None
        return int(response.json()["id"]), {"Authorization": f"Bearer {response.json()['key']}"}

    robot_id, robot = ownerless("deploy-robot", "admin")
    screen_id, screen = ownerless("wall-screen", "read-only")
    _, trigger = ownerless("nightly-trigger", "eval-jobset")
    for attacker in (screen, trigger):
        revoked = api.call("DELETE", f"/api-keys/{robot_id}", attacker)
        assert revoked.status_code in (403, 404), revoked.text
        peek = api.call("GET", f"/api-keys/{robot_id}", attacker)
        assert peek.status_code == 404, peek.text
    # the robot's key still works; an ownerless key is not even its own
    assert api.call("GET", "/admin/audit-log", robot).status_code == 200
    assert api.call("DELETE", f"/api-keys/{screen_id}", screen).status_code == 404
    assert api.call("GET", "/api-keys?all=true", screen).json()["items"] == []
    # positive control: an admin revokes it
    assert api.call("DELETE", f"/api-keys/{robot_id}").status_code == 204
    assert api.call("GET", "/admin/audit-log", robot).status_code == 401
