"""Issue 12 §5: a hidden project stays hidden from everyone but admins and its members.

A live ``circus-server`` holds two projects made from a real build: ``open`` (visible) and
a hidden one. The outsider has the ``eval-jobset`` role but is no member of the hidden
project; every route must answer them exactly as it answers for objects that do not exist.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from circus.cache.publish import publish_outputs
from circus.common.models import Evaluation, Jobset
from tests.api.live import ADMIN_KEY
from tests.conftest import KeyPair
from tests.security.web_support import (
    MEMBER_KEY,
    OUTSIDER_KEY,
    World,
    app_for,
    bearer,
    build_malicious_output,
    get_rules,
    populate_project,
    world_server,
)

WEBHOOK_SECRET = "hidden-webhook-secret-0123456789"


@pytest.fixture(scope="module")
def world(engine: Engine, database_url: str, redis_url: str, cache_key: KeyPair,
          nix_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[World]:
    state = tmp_path_factory.mktemp("hidden")
    nonce = uuid.uuid4().hex
    built = build_malicious_output(nonce)
    visible = build_malicious_output(uuid.uuid4().hex)
    with world_server(engine, database_url, redis_url, state,
                      CIRCUS_SIGNING__ENABLED="true",
                      CIRCUS_SIGNING__KEY=cache_key.secret,
                      # the metrics and queue pages are admin-only by default; open them
                      # to be attacked
                      CIRCUS_SERVER__PAGE_ACCESS='{"metrics": "authenticated", '
                                                 '"queue": "authenticated"}') as made:
        log_dir = Path(made.settings.logs.log_dir)
        with Session(engine, expire_on_commit=False) as session:
            hidden = populate_project(session, log_dir, built, name=f"hush-{nonce[:8]}",
                                      hidden=True)
            shown = populate_project(session, log_dir, visible, name="open", hidden=False)
            session.commit()
            publish_outputs(session, made.settings, hidden["build_id"])
            session.commit()
            jobset_ids = [hidden["jobset_id"]]
            commits = list(session.scalars(
                Evaluation.__table__.select().with_only_columns(Evaluation.commit_hash)
                .where(Evaluation.jobset_id.in_(jobset_ids))))
            assert session.get(Jobset, hidden["jobset_id"]) is not None
        made.ids = {**hidden, "nonce": nonce, "commits": commits,
                    "open": shown}
        created = requests.post(f"{made.server.url}/api/v1/projects/{hidden['project']}/webhooks",
                                json={"forge_type": "github", "secret": WEBHOOK_SECRET},
                                headers=bearer(ADMIN_KEY), timeout=10)
        assert created.status_code == 201, created.text
        yield made


def get(world: World, path: str, key: str | None = OUTSIDER_KEY, **kwargs: Any
        ) -> requests.Response:
    return requests.get(world.server.url + path, headers=bearer(key) if key else {},
                        timeout=10, **kwargs)


def post(world: World, path: str, key: str | None = OUTSIDER_KEY, **kwargs: Any
         ) -> requests.Response:
    headers = {**(bearer(key) if key else {}), **kwargs.pop("headers", {})}
    return requests.post(world.server.url + path, headers=headers, timeout=10, **kwargs)


def assert_not_found(response: requests.Response) -> None:
    assert response.status_code == 404, (response.status_code, response.text[:300])
    assert response.headers["Content-Type"].startswith("application/json")
    assert "error" in response.json()


# ---------------------------------------------------------------------------
# the attacks, one by one


def test_trigger_by_jobset_id_of_a_hidden_project_is_404_not_202(world: World) -> None:
    ids = world.ids
    by_id = post(world, "/api/v1/evaluations/trigger", json={"jobset_id": ids["jobset_id"]})
    assert_not_found(by_id)
    assert by_id.json()["error"] == f"no jobset with id {ids['jobset_id']}"
    by_name = post(world, "/api/v1/evaluations/trigger",
                   json={"project": ids["project"], "jobset": ids["jobset"]})
    assert_not_found(by_name)
    # the same role on a visible project works: the 404 is visibility, not permission
    allowed = post(world, "/api/v1/evaluations/trigger",
                   json={"jobset_id": ids["open"]["jobset_id"]})
    assert allowed.status_code == 202, allowed.text
    # a member of the hidden project sees it (and members may trigger)
    member = post(world, "/api/v1/evaluations/trigger", key=MEMBER_KEY,
                  json={"jobset_id": ids["jobset_id"]})
    assert member.status_code == 202, member.text


def test_compare_with_a_hidden_evaluation_is_404(world: World) -> None:
    mine, theirs = world.ids["open"]["evaluation_id"], world.ids["evaluation_id"]
    assert_not_found(get(world, f"/api/v1/evaluations/{mine}/compare?to={theirs}"))
    page = get(world, f"/eval/{mine}?compare={theirs}")
    assert page.status_code == 404
    assert world.ids["nonce"] not in page.text
    assert get(world, f"/eval/{mine}?compare={mine}").status_code == 200


def test_metrics_time_series_of_a_hidden_project_or_jobset_is_404(world: World) -> None:
    ids = world.ids
    for arg in (f"project_id={ids['project_id']}", f"jobset_id={ids['jobset_id']}"):
        for series in ("builds", "duration"):
            assert_not_found(get(world, f"/api/v1/metrics/timeseries/{series}?{arg}"))
    # the unfiltered series count no build of the hidden project
    everything = get(world, "/api/v1/metrics/timeseries/builds?days=1", key=ADMIN_KEY).json()
    outside = get(world, "/api/v1/metrics/timeseries/builds?days=1").json()
    total = sum(sum(p["values"].values()) for p in everything["series"])
    seen = sum(sum(p["values"].values()) for p in outside["series"])
    assert total == seen + 1  # the hidden project's one finished build
    # per-system counts and the dashboard's metrics page count only visible builds too
    def system_total(key: str) -> int:
        systems = get(world, "/api/v1/metrics/systems", key=key).json()["systems"]
        return sum(s["pending"] + s["running"] + s["succeeded"] + s["failed"] for s in systems)

    assert system_total(ADMIN_KEY) == system_total(OUTSIDER_KEY) + 2

    def page_total(key: str) -> int:
        page = get(world, "/stats", key=key)
        assert page.status_code == 200
        by_status = page.text.split("Builds by status")[1].split("<h2>")[0]
        return sum(int(n) for n in re.findall(r'<td class="num">(\d+)</td>', by_status))

    assert page_total(ADMIN_KEY) == page_total(OUTSIDER_KEY) + 2


def test_queue_counters_count_no_build_of_a_hidden_project(world: World) -> None:
    """The home page (public) and the queue page say how many builds are queued and
    running: a stranger must not learn from them that a hidden project is building."""
    def running(page: str, key: str | None) -> int:
        answer = get(world, page, key=key)
        assert answer.status_code == 200, (page, answer.status_code)
        pattern = r'<span class="big">(\d+)</span> builds running' if page == "/" \
            else r"builds queued, (\d+) running"
        found = re.search(pattern, answer.text)
        assert found is not None, page
        return int(found.group(1))

    # each project has one running build
    assert running("/", ADMIN_KEY) == 2
    assert running("/", None) == running("/", OUTSIDER_KEY) == 1
    assert running("/", MEMBER_KEY) == 2
    assert running("/queue", ADMIN_KEY) == 2
    assert running("/queue", OUTSIDER_KEY) == 1


def test_badges_of_a_hidden_job_are_those_of_a_job_that_does_not_exist(world: World) -> None:
    ids = world.ids
    for key in (OUTSIDER_KEY, None):
        for job in ("manual", "running"):  # finished, and still running (was "pending")
            badge = get(world, f"/job/{ids['project']}/main/{job}/badge", key=key)
            ghost = get(world, f"/job/ghost-project/main/{job}/badge", key=key)
            assert badge.status_code == 200
            assert badge.content == ghost.content
            assert "unknown" in badge.text
            shield = get(world, f"/job/{ids['project']}/main/{job}/shield", key=key)
            assert shield.json()["message"] == "unknown"
        assert_not_found(get(world, f"/job/{ids['project']}/main/manual/latest", key=key))
    member = get(world, f"/job/{ids['project']}/main/manual/badge", key=MEMBER_KEY)
    assert "passing" in member.text


def test_starring_a_hidden_job_is_404(world: World) -> None:
    ids = world.ids
    starred = post(world, "/api/v1/me/starred-jobs",
                   json={"jobset_id": ids["jobset_id"], "job_name": "manual"})
    assert_not_found(starred)
    assert starred.json()["error"] == f"no jobset with id {ids['jobset_id']}"


def test_a_channel_on_a_hidden_jobset_cannot_be_made_or_changed_by_an_outsider(
        world: World) -> None:
    ids = world.ids
    made = post(world, "/api/v1/channels", json={"jobset_id": ids["jobset_id"],
                                                 "name": "sneaky"})
    assert_not_found(made)
    assert made.json()["error"] == f"no jobset with id {ids['jobset_id']}"
    for method, path in (("DELETE", f"/api/v1/channels/{ids['channel']}"),
                         ("POST", f"/api/v1/channels/{ids['channel']}/promote/"
                                  f"{ids['other_evaluation_id']}")):
        answer = requests.request(method, world.server.url + path, timeout=10,
                                  headers=bearer(OUTSIDER_KEY))
        assert_not_found(answer)  # not 403 naming the project's id
        assert answer.json() == {"error": f"no channel {ids['channel']}", "details": None}


def _github(world: World, project: str, signature: str | None) -> requests.Response:
    body = json.dumps({"zen": "hi", "hook_id": 1}).encode()
    headers = {"X-GitHub-Event": "ping", "X-GitHub-Delivery": str(uuid.uuid4()),
               "Content-Type": "application/json"}
    if signature is not None:
        headers["X-Hub-Signature-256"] = "sha256=" + hmac.new(
            signature.encode(), body, hashlib.sha256).hexdigest()
    return post(world, f"/api/v1/webhooks/{project}/github", key=None, data=body,
                headers=headers)


def test_forge_webhook_of_a_hidden_project_answers_404_without_the_secret(
        world: World) -> None:
    project = world.ids["project"]
    for signature in (None, "wrong-secret"):
        answer = _github(world, project, signature)
        ghost = _github(world, "ghost-project", signature)
        assert_not_found(answer)
        assert answer.json()["error"] == f"no enabled github webhook for project {project}"
        assert ghost.status_code == 404
    # whoever holds the secret (the forge) is served
    assert _github(world, project, WEBHOOK_SECRET).json()["action"] == "pong"


def test_search_finds_nothing_of_a_hidden_project(world: World) -> None:
    ids = world.ids
    for q in (ids["project"], ids["nonce"], ids["hash"], str(ids["build_id"]), "manual"):
        found = get(world, f"/api/v1/search?q={q}").json()
        found.pop("query")  # the question, echoed
        hits = [h for kind in ("projects", "jobsets", "jobs", "builds", "store_paths")
                for h in found.get(kind, [])]
        assert all(h.get("project_id") != ids["project_id"] for h in hits), (q, hits)
        assert ids["nonce"] not in json.dumps(found)
        page = get(world, f"/search?q={q}")
        assert page.status_code == 200
        shown = page.text.replace(q, "")  # the question, echoed in the search box
        assert ids["nonce"] not in shown
        assert "/build/" + str(ids["build_id"]) not in shown


def test_live_log_streams_of_a_hidden_build_are_404(world: World) -> None:
    ids = world.ids
    for build in (ids["build_id"], ids["running_build_id"]):
        assert_not_found(get(world, f"/api/v1/builds/{build}/log/stream", stream=True))
        page = get(world, f"/build/{build}/log/stream", stream=True)
        assert page.status_code == 404


def test_channels_of_a_hidden_project_are_404_but_serve_members(world: World) -> None:
    channel = world.ids["channel"]
    for path in (f"/channel/{channel}/git-revision", f"/api/v1/channels/{channel}"):
        assert_not_found(get(world, path))
        assert get(world, path, key=MEMBER_KEY).status_code == 200
    assert channel not in get(world, "/api/v1/channels").text
    assert channel not in get(world, "/channels").text


def test_private_binary_cache_answers_are_cache_control_private(world: World) -> None:
    ids = world.ids
    base = f"/projects/{ids['project']}/nix-cache"
    assert_not_found(get(world, f"{base}/{ids['hash']}.narinfo"))
    assert get(world, f"/nix-cache/{ids['hash']}.narinfo").status_code == 404
    narinfo = get(world, f"{base}/{ids['hash']}.narinfo", key=MEMBER_KEY)
    assert narinfo.status_code == 200, narinfo.text
    assert narinfo.headers["Cache-Control"].startswith("private")
    url = re.search(r"^URL: (\S+)$", narinfo.text, re.M)
    assert url is not None
    nar = get(world, f"{base}/{url.group(1)}", key=MEMBER_KEY)
    assert nar.status_code == 200
    assert nar.headers["Cache-Control"].startswith("private")
    info = get(world, f"{base}/nix-cache-info", key=MEMBER_KEY)
    assert info.headers["Cache-Control"].startswith("private")
    public = get(world, "/projects/open/nix-cache/nix-cache-info")
    assert "private" not in public.headers.get("Cache-Control", "")


# ---------------------------------------------------------------------------
# every GET route


#: ids (and names) that exist nowhere: a hidden object must look exactly like one of these
GHOST = {"project": "ghost-project", "project_id": 10**9, "jobset": "main",
         "jobset_id": 10**9 + 1, "job": "manual", "evaluation_id": 10**9 + 2,
         "other_evaluation_id": 10**9 + 3, "build_id": 10**9 + 4, "step_id": 10**9 + 5,
         "product_id": 10**9 + 6, "channel": "ghost-unstable", "star_id": 10**9 + 7,
         "hash": "0" * 32}
#: arguments of admin-only records (users, keys, builders...): the same in both requests
NEUTRAL = {"builder_id": 1, "machine_id": "none", "task_id": 1, "news_id": 1, "key_id": 1,
           "user_id": 1, "input_name": "none", "sub": "doc/index.html",
           "filename": "circus.css", "config_id": 1, "webhook_id": 1, "forge": "github",
           "keep": "true", "action": "keep"}
#: query strings routes take an object by (the rest of the route is filled from the path)
QUERIES = {
    "evaluations.compare": "to={other_evaluation_id}",
    "dashboard.evaluation": "compare={other_evaluation_id}",
    "misc.builds_series": "project_id={project_id}",
    "misc.duration_series": "jobset_id={jobset_id}",
    "builds.list_builds": "project_id={project_id}",
    "evaluations.list_evaluations": "jobset_id={jobset_id}",
    "misc.search": "q={project}",
    "dashboard.search": "q={project}",
    "build-files.log": "step={step_id}",
    "build-files.log_stream": "step={step_id}",
    "dashboard.log": "step={step_id}",
    "dashboard.build": "step={step_id}",
}


def route_url(endpoint: str, rule: str, ids: dict[str, Any]) -> str | None:
    values = {**NEUTRAL, **ids, "name": ids["channel"]}
    missing: list[str] = []

    def value(match: re.Match[str]) -> str:
        arg = match.group(1)
        if arg == "name" and "nix-cache" in rule:
            return str(values["hash"])
        if arg not in values:
            missing.append(arg)
            return ""
        return str(values[arg])

    url = re.sub(r"<(?:[a-z]+(?:\([^)]*\))?:)?([a-z_]+)>", value, rule)
    if missing:
        return None
    query = QUERIES.get(endpoint)
    return url + ("?" + query.format(**values) if query else "")


@pytest.mark.parametrize("who", ["outsider", "anonymous"])
def test_every_get_route_answers_an_outsider_as_if_the_hidden_project_did_not_exist(
        world: World, who: str) -> None:
    """Each GET route, once with the hidden project's ids and once with ids that exist
    nowhere: same status, and nothing of the hidden project in the body. A route whose
    arguments this test cannot fill fails it."""
    ids = world.ids
    secrets = [ids["nonce"], ids["project"], *ids["commits"], ids["hash"]]
    unfilled, leaks = [], []
    for endpoint, rule in get_rules(app_for(world.settings)):
        hidden_url = route_url(endpoint, rule, ids)
        ghost_url = route_url(endpoint, rule, {**ids, **GHOST})
        if hidden_url is None or ghost_url is None:
            unfilled.append(rule)
            continue
        key = OUTSIDER_KEY if who == "outsider" else None
        with get(world, hidden_url, key, stream=True, allow_redirects=False) as hidden, \
                get(world, ghost_url, key, stream=True, allow_redirects=False) as ghost:
            body = hidden.raw.read(512 * 1024).decode(errors="replace")
            if hidden.status_code != ghost.status_code:
                leaks.append((hidden_url, hidden.status_code, ghost_url, ghost.status_code))
            leaked = [s for s in secrets if s not in hidden_url and s in body]
            if leaked:
                leaks.append((hidden_url, hidden.status_code, "body shows", leaked))
    assert not unfilled, f"routes this test cannot fill: {unfilled}"
    assert not leaks, "routes that tell a hidden project from a missing one:\n" + \
        "\n".join(map(str, leaks))


def test_every_mutation_answers_an_outsider_as_if_the_hidden_project_did_not_exist(
        world: World) -> None:
    """POST, PUT and DELETE routes with the hidden project's ids and with ids that exist
    nowhere: the same status (a 403 where a missing object gives 404 would confirm that
    the object exists). Runs last: a route that wrongly acts would change the world."""
    ids = world.ids
    unfilled, leaks = [], []
    app = app_for(world.settings)
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        for method in sorted((rule.methods or set()) - {"GET", "HEAD", "OPTIONS"}):
            hidden_url = route_url(rule.endpoint, rule.rule, ids)
            ghost_url = route_url(rule.endpoint, rule.rule, {**ids, **GHOST})
            if hidden_url is None or ghost_url is None:
                unfilled.append(rule.rule)
                continue
            if rule.endpoint == "evaluations.trigger":
                continue  # takes its jobset in the body: the trigger test above
            hidden = requests.request(method, world.server.url + hidden_url, json={},
                                      headers=bearer(OUTSIDER_KEY), timeout=10)
            ghost = requests.request(method, world.server.url + ghost_url, json={},
                                     headers=bearer(OUTSIDER_KEY), timeout=10)
            if hidden.status_code != ghost.status_code:
                leaks.append((method, hidden_url, hidden.status_code, ghost.status_code,
                              hidden.text[:120]))
    assert not unfilled, f"routes this test cannot fill: {unfilled}"
    assert not leaks, "mutations that tell a hidden project from a missing one:\n" + \
        "\n".join(map(str, leaks))
