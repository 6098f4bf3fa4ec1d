"""A query argument a route does not declare is a 400 naming it, never silently ignored.

Found by a new user: ``GET /api/v1/builds?project=demo`` (the filter is ``project_id``)
answered every build, so a script acting on "the builds of demo" acted on all of them.
"""

from __future__ import annotations

import re
from typing import Any

from flask import Flask
from flask.testing import FlaskClient

from circus.common.enums import BuildStatus
from circus.server.api import BLUEPRINTS
from circus.server.api.queryargs import TOLERANT_ENDPOINTS
from tests.api.conftest import World

#: a value for every path argument of the API (a new one fails the walk until added)
PATH_VALUES: dict[str, Any] = {
    "build_id": 1, "builder_id": 1, "machine_id": "m-1", "task_id": 1, "key_id": 1,
    "evaluation_id": 1, "channel": "stable", "news_id": 1, "project": "demo",
    "jobset": "main", "input_name": "src", "user_id": 1, "config_id": 1, "webhook_id": 1,
    "product_id": 1, "step_id": 1, "star_id": 1, "keep": "true", "forge": "github",
}
#: routes whose schema lets GitHub add what it likes to the callback URL
LENIENT_SCHEMAS = {"users.github_callback"}


def fill(rule: str) -> tuple[str, list[str]]:
    missing: list[str] = []

    def value(match: re.Match[str]) -> str:
        if match.group(1) not in PATH_VALUES:
            missing.append(match.group(1))
            return ""
        return str(PATH_VALUES[match.group(1)])

    return re.sub(r"<(?:[a-z]+(?:\([^)]*\))?:)?([a-z_]+)>", value, rule), missing


def documented_query(app: Flask, rule: str, method: str) -> list[str]:
    """The query parameters the OpenAPI document lists for ``method rule``."""
    spec = app.extensions["flask-smorest"]["apis"][""]["ext_obj"].spec.to_dict()
    path = re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", rule)
    operation = spec["paths"][path][method.lower()]
    return sorted(p["name"] for p in operation.get("parameters", []) if p["in"] == "query")


def api_routes(app: Flask) -> list[tuple[str, str, str]]:
    """(endpoint, rule, method) of every route of the API's blueprints."""
    prefixes = tuple(f"{blp.name}." for blp in BLUEPRINTS)
    return sorted((rule.endpoint, rule.rule, method) for rule in app.url_map.iter_rules()
                  if rule.endpoint.startswith(prefixes)
                  for method in (rule.methods or set()) - {"HEAD", "OPTIONS"})


def test_every_api_route_refuses_an_unknown_query_argument_naming_it(
        app: Flask, client: FlaskClient, admin: dict[str, str]) -> None:
    """Every method of every /api/v1 route with ``?nosuch=1``: a 400 whose error names
    ``nosuch`` and lists exactly the query arguments the OpenAPI document gives the route.
    A route whose path this walk cannot fill fails it."""
    unfilled, wrong, walked = [], [], 0
    for endpoint, rule, method in api_routes(app):
        if endpoint in TOLERANT_ENDPOINTS or endpoint in LENIENT_SCHEMAS:
            continue
        url, missing = fill(rule)
        if missing:
            unfilled.append((rule, missing))
            continue
        walked += 1
        response = client.open(url + "?nosuch=1", method=method, headers=admin, json={})
        body = response.get_json(silent=True) or {}
        accepted = documented_query(app, rule, method)
        expected_details = {"query": {"nosuch": ["unknown argument"]}, "accepted": accepted}
        if (response.status_code != 400 or set(body) != {"error", "details"}
                or not body["error"].startswith("unknown query argument: nosuch (")
                or any(name not in body["error"] for name in accepted)
                or body["details"] != expected_details):
            wrong.append((method, url, response.status_code, body))
    assert not unfilled, f"routes this test cannot fill: {unfilled}"
    assert not wrong, "routes that do not refuse ?nosuch=1:\n" + "\n".join(map(str, wrong))
    assert walked > 90


def test_builds_filtered_by_a_misspelled_project_argument_are_a_400_not_every_build(
        client: FlaskClient, admin: dict[str, str], world: World) -> None:
    demo = world.project("demo")
    other = world.project("other")
    for project in (demo, other):
        world.build(world.evaluation(world.jobset(project)), "hello",
                    status=BuildStatus.succeeded)
    world.db.commit()
    misspelled = client.get("/api/v1/builds?project=demo", headers=admin)
    assert misspelled.status_code == 400, misspelled.text
    body = misspelled.get_json()
    assert body["error"].startswith("unknown query argument: project (accepted: cursor, ")
    assert "project_id" in body["error"]
    assert body["details"]["query"] == {"project": ["unknown argument"]}
    assert "project_id" in body["details"]["accepted"]
    # the declared filter still filters
    filtered = client.get(f"/api/v1/builds?project_id={demo.id}", headers=admin)
    assert filtered.status_code == 200
    assert [b["project_id"] for b in filtered.get_json()["items"]] == [demo.id]


def test_every_unknown_argument_is_named_and_a_route_without_arguments_says_so(
        client: FlaskClient, admin: dict[str, str]) -> None:
    both = client.get("/api/v1/builds?limit=5&projet=demo&stauts=failed", headers=admin)
    assert both.status_code == 400
    assert both.get_json()["error"].startswith("unknown query arguments: projet, stauts (")
    assert set(both.get_json()["details"]["query"]) == {"projet", "stauts"}
    none = client.get("/api/v1/me?verbose=1", headers=admin)
    assert none.status_code == 400
    assert none.get_json() == {
        "error": "unknown query argument: verbose (this route takes no query arguments)",
        "details": {"query": {"verbose": ["unknown argument"]}, "accepted": []}}
    # nothing is done by a refused mutation
    assert client.post("/api/v1/projects?dry_run=1", headers=admin,
                       json={"name": "made"}).status_code == 400
    assert client.get("/api/v1/projects/made", headers=admin).status_code == 404


def test_routes_left_lenient_still_ignore_what_they_do_not_know(
        client: FlaskClient, admin: dict[str, str]) -> None:
    """GitHub's callback (GitHub chooses its arguments), the live log stream, forge
    webhooks and the OpenAPI document are out of this rule."""
    callback = client.get("/api/v1/auth/github/callback?code=x&state=y&error_uri=z")
    assert callback.status_code == 404  # GitHub login is not enabled here: not a 400
    assert "GitHub login" in callback.get_json()["error"]
    stream = client.get("/api/v1/builds/1/log/stream?offset=0", headers=admin)
    assert stream.status_code == 404
    hook = client.post("/api/v1/webhooks/ghost/github?x=1", json={})
    assert hook.status_code != 400 or "unknown query" not in hook.get_json()["error"]
    assert client.get("/api/v1/openapi.json?v=2").status_code == 200
