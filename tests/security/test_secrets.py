"""Issue 12 §1 (secrets stay home) and §7 (job filters, replayed deliveries), attacked
against a real circus-server (the API) and a real circus-evaluator (which delivers
notifications), sharing one database and Redis.

The attacker, ``mallory``, holds only the ``create-projects`` role: she owns the
projects she creates and so may configure their notifications and webhooks.

The server's allowlist names the host ``localhost`` (not the address 127.0.0.1), so
one listener on 127.0.0.1 is reachable as ``http://localhost:<port>`` (the positive
control) and refused as ``http://127.0.0.1:<port>``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import requests
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from circus.common.enums import BuildStatus, EvaluationStatus, TriggerKind
from circus.common.models import Build, Evaluation, EvaluationBuild
from circus.common.models.base import utcnow
from tests.api.live import ADMIN_KEY, LiveServer, live_server
from tests.helpers.daemons import Daemon, circus_command, wait_until
from tests.notifications.stubs import HttpStub

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
MALLORY_KEY = "mallory-create-projects-key-0123456789"
MALLORY = {"Authorization": f"Bearer {MALLORY_KEY}"}
SERVER_TOKEN = "server-wide-github-token-do-not-leak"
SHA = "0123456789abcdef0123456789abcdef01234567"
HOOK_SECRET = "forge-hook-secret"


@dataclass
class World:
    server: LiveServer
    evaluator: Daemon
    #: the real forge (notifications.github_api_url is localhost:<port>/github)
    forge: HttpStub
    #: what mallory controls
    listener: HttpStub
    engine: Engine

    @property
    def api(self) -> str:
        return self.server.url + "/api/v1"

    def local(self, stub: HttpStub, path: str) -> str:
        """The stub's URL by host name (allow-listed)."""
        return stub.url.replace("127.0.0.1", "localhost") + path


def _stub() -> HttpStub:
    return HttpStub().start()


@pytest.fixture(scope="module")
def world(engine: Engine, database_url: str, redis_url: str, nix_env: dict[str, str],
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    state = tmp_path_factory.mktemp("security-secrets")
    forge, listener = _stub(), _stub()
    secret_file = state / "hook-secret"
    secret_file.write_text("server-side-secret\n")
    declarative = {
        "users": [{"username": "root", "role": "admin"},
                  {"username": "mallory", "role": "create-projects"}],
        "api_keys": [{"name": "live-admin", "key": ADMIN_KEY, "role": "admin", "owner": "root"},
                     {"name": "mallory", "key": MALLORY_KEY, "role": "create-projects",
                      "owner": "mallory"}],
        # server-side config may name server files
        "projects": [{"name": "ops", "notifications": [{"type": "webhook", "config": {
            "url": "https://hooks.example.org/ops", "secret_file": str(secret_file)}}]}],
    }
    extra = {
        "CIRCUS_SERVER__BASE_URL": "https://ci.example.org",
        "CIRCUS_SERVER__OUTBOUND_ALLOWLIST": json.dumps(["localhost"]),
        "CIRCUS_NOTIFICATIONS__GITHUB_TOKEN": SERVER_TOKEN,
        "CIRCUS_NOTIFICATIONS__GITHUB_API_URL":
            forge.url.replace("127.0.0.1", "localhost") + "/github",
        "CIRCUS_NOTIFICATIONS__COLLECT_INTERVAL": "0.3",
        "CIRCUS_NOTIFICATIONS__MAX_ATTEMPTS": "1",
        "CIRCUS_NOTIFICATIONS__HTTP_TIMEOUT": "3",
    }
    try:
        with live_server(engine, database_url, redis_url, state, declarative,
                         **extra) as server:
            env = {**server.env, **nix_env}
            evaluator = Daemon("evaluator", [circus_command("circus-evaluator")],
                               state / "daemon-logs", env=env, cwd=state)
            evaluator.start()
            try:
                yield World(server, evaluator, forge, listener, engine)
            except BaseException:
                print("--- evaluator log ---\n" + evaluator.log()[-4000:])
                raise
            finally:
                evaluator.stop()
    finally:
        forge.stop()
        listener.stop()


def call(world: World, method: str, path: str, headers: dict[str, str],
         **kwargs: Any) -> requests.Response:
    return requests.request(method, world.api + path, headers=headers, timeout=10, **kwargs)


def mallorys_project(world: World, name: str) -> tuple[int, int]:
    """A project (GitHub repository acme/widget) and jobset of mallory's; their ids."""
    created = call(world, "POST", "/projects", MALLORY,
                   json={"name": name, "repository_url": "https://github.com/acme/widget"})
    assert created.status_code == 201, created.text
    jobset = call(world, "POST", f"/projects/{name}/jobsets", MALLORY,
                  json={"name": "main", "branch": "main", "flake_mode": False,
                        "nix_expression": "default.nix", "state": "disabled"})
    assert jobset.status_code == 201, jobset.text
    return int(created.json()["id"]), int(jobset.json()["id"])


def notification(world: World, project: str, type: str, config: dict[str, Any]) -> int:
    created = call(world, "POST", f"/projects/{project}/notifications", MALLORY,
                   json={"type": type, "config": config})
    assert created.status_code == 201, created.text
    return int(created.json()["id"])


def finish_a_build(world: World, project_id: int, jobset_id: int) -> int:
    """What the queue runner does when a build finishes: status and the event stamp."""
    with Session(world.engine) as session:
        evaluation = Evaluation(jobset_id=jobset_id, trigger_kind=TriggerKind.manual,
                                status=EvaluationStatus.completed, commit_hash=SHA)
        session.add(evaluation)
        session.flush()
        build = Build(evaluation_id=evaluation.id, jobset_id=jobset_id, project_id=project_id,
                      job_name="hello", system="x86_64-linux", status=BuildStatus.succeeded,
                      drv_path=f"/nix/store/{uuid.uuid4().hex}-hello.drv",
                      notification_pending_since=utcnow())
        session.add(build)
        session.flush()
        session.add(EvaluationBuild(evaluation_id=evaluation.id, build_id=build.id,
                                    is_new=True))
        session.commit()
        return build.id


def tasks_of(world: World, build_id: int) -> dict[int, dict[str, Any]]:
    """The build's notification tasks by config id, as the admin API shows them."""
    answer = call(world, "GET", "/admin/notification-tasks?limit=100", ADMIN)
    assert answer.status_code == 200, answer.text
    return {t["config_id"]: t for t in answer.json()["items"] if t["build_id"] == build_id}


def settled(world: World, build_id: int, configs: list[int]) -> dict[int, dict[str, Any]]:
    def done() -> bool:
        found = tasks_of(world, build_id)
        return all(found.get(c, {}).get("status") in ("completed", "failed") for c in configs)

    wait_until(done, timeout=60, message="the notification tasks to finish")
    return tasks_of(world, build_id)


# ---------------------------------------------------------------------------
# §1 secrets stay home


def test_api_configs_cannot_name_server_files(world: World) -> None:
    mallorys_project(world, "files")
    for type, key in (("github_status", "token_file"), ("webhook", "secret_file"),
                      ("gitlab_status", "token_file")):
        config = {key: "/etc/circus/secret_key"}
        if type == "webhook":
            config["url"] = "https://hooks.example.org/x"
        refused = call(world, "POST", "/projects/files/notifications", MALLORY,
                       json={"type": type, "config": config})
        assert refused.status_code == 400, refused.text
        assert f"{key}: names a file on the server" in refused.json()["error"]
        assert key in "".join(refused.json()["details"]["config"])
    # admins are refused through the API too: files are for the server's own config
    as_admin = call(world, "POST", "/projects/files/notifications", ADMIN,
                    json={"type": "github_status", "config": {"token_file": "/etc/passwd"}})
    assert as_admin.status_code == 400
    # the server-side declarative config may (it started with one)
    listed = call(world, "GET", "/projects/ops/notifications", ADMIN)
    assert listed.status_code == 200
    assert [n["config"].get("secret_file") for n in listed.json()["items"]] != [None]


def test_the_server_token_never_follows_a_project_chosen_url(world: World) -> None:
    project_id, jobset_id = mallorys_project(world, "steal")
    # the attack: the server's token (none given) sent to mallory's "GitHub"
    stolen = notification(world, "steal", "github_status",
                          {"api_url": world.local(world.listener, "/steal")})
    # positive control: the configured GitHub gets the server's token
    honest = notification(world, "steal", "github_status", {})
    # a project may bring its own token to its own URL
    own = notification(world, "steal", "github_status",
                       {"api_url": world.local(world.listener, "/own"), "token": "mallorys"})
    build_id = finish_a_build(world, project_id, jobset_id)
    tasks = settled(world, build_id, [stolen, honest, own])

    assert tasks[honest]["status"] == "completed", tasks[honest]
    (forged,) = world.forge.under("/github")
    assert forged.headers["authorization"] == f"Bearer {SERVER_TOKEN}"
    assert tasks[stolen]["status"] == "failed"
    assert "server's GitHub token is only sent to its configured URL" in \
        tasks[stolen]["last_error"]
    assert world.listener.under("/steal") == []
    assert tasks[own]["status"] == "completed", tasks[own]
    assert [r.headers["authorization"] for r in world.listener.under("/own")] == \
        ["Bearer mallorys"]
    assert all(SERVER_TOKEN not in json.dumps(r.headers) for r in world.listener.requests)


def test_notification_targets_on_private_addresses_are_refused(world: World) -> None:
    project_id, jobset_id = mallorys_project(world, "ssrf")
    port = world.listener.url.rsplit(":", 1)[1]
    attacks = {
        "loopback": f"http://127.0.0.1:{port}/loopback",
        "metadata": "http://169.254.169.254/latest/meta-data/",
        "private": "http://10.255.255.1/internal",
        "ipv6 loopback": f"http://[::1]:{port}/v6",
        "mapped": f"http://[::ffff:127.0.0.1]:{port}/mapped",
        # judged after resolution, not by how the URL spells the host
        "short form": f"http://127.1:{port}/short",
        "decimal": f"http://2130706433:{port}/decimal",
    }
    ids = {name: notification(world, "ssrf", "webhook", {"url": url})
           for name, url in attacks.items()}
    slack = notification(world, "ssrf", "slack",
                         {"webhook_url": f"http://127.0.0.1:{port}/slack"})
    allowed = notification(world, "ssrf", "webhook",
                           {"url": world.local(world.listener, "/allowed")})
    # an allowed host answering with a redirect (to anywhere): not followed
    world.listener.answer("/redirect", 302)
    redirect = notification(world, "ssrf", "webhook",
                            {"url": world.local(world.listener, "/redirect")})
    build_id = finish_a_build(world, project_id, jobset_id)
    tasks = settled(world, build_id, [*ids.values(), slack, allowed, redirect])

    expected = {"loopback": "a loopback address", "metadata": "a cloud metadata address",
                "private": "a private address", "ipv6 loopback": "a loopback address",
                "mapped": "a loopback address", "short form": "a loopback address",
                "decimal": "a loopback address"}
    for name, config_id in ids.items():
        task = tasks[config_id]
        assert task["status"] == "failed", (name, task)
        assert "refused:" in task["last_error"], (name, task["last_error"])
        assert expected[name] in task["last_error"], (name, task["last_error"])
        assert "server.outbound_allowlist" in task["last_error"]
    assert tasks[slack]["status"] == "failed"
    assert "refused:" in tasks[slack]["last_error"]
    assert tasks[redirect]["status"] == "failed"
    assert "answered 302: redirects are not followed" in tasks[redirect]["last_error"]
    assert [r.path for r in world.listener.requests
            if not r.path.startswith(("/allowed", "/redirect", "/own", "/steal"))] == []
    # positive control: the allow-listed host name reaches the same listener
    assert tasks[allowed]["status"] == "completed", tasks[allowed]
    assert len(world.listener.under("/allowed")) == 1


def test_delivery_errors_with_answers_are_shown_to_admins_only(world: World) -> None:
    project_id, jobset_id = mallorys_project(world, "echo")
    world.listener.answer("/echo", 500)
    config = notification(world, "echo", "webhook", {"url": world.local(world.listener,
                                                                        "/echo")})
    build_id = finish_a_build(world, project_id, jobset_id)
    task = settled(world, build_id, [config])[config]
    assert task["status"] == "failed"
    assert "stub failure" in task["last_error"]  # admins see the answer
    for path in ("/admin/notification-tasks", "/admin/notification-tasks?status=failed"):
        refused = call(world, "GET", path, MALLORY)
        assert refused.status_code == 403, refused.text
        assert "stub failure" not in refused.text
    listed = call(world, "GET", "/projects/echo/notifications", MALLORY)
    assert listed.status_code == 200
    assert "stub failure" not in listed.text


# ---------------------------------------------------------------------------
# §7 job filters and replayed deliveries


@pytest.mark.parametrize("pattern", ["(a+)+$", "(a|aa)*b", "(\\w+\\s?)+$", "(.*)*x",
                                     "(a)\\1", ".*.*.*.*.*.*x", "a" * 300])
def test_catastrophic_job_filters_are_refused_when_saved(world: World, pattern: str) -> None:
    if call(world, "GET", "/projects/redos", MALLORY).status_code == 404:
        mallorys_project(world, "redos")
    started = time.monotonic()
    refused = call(world, "POST", "/projects/redos/notifications", MALLORY,
                   json={"type": "webhook", "config": {"url": "https://hooks.example.org/x",
                                                       "jobs": pattern}})
    assert time.monotonic() - started < 5
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"].startswith("invalid webhook notification config: jobs")


def test_ordinary_job_filters_are_accepted(world: World) -> None:
    mallorys_project(world, "filters")
    for pattern in ("hello", ".*-linux", "(x86_64|aarch64)-linux\\..*", "tests\\.[a-z0-9_]+"):
        notification(world, "filters", "webhook",
                     {"url": "https://hooks.example.org/x", "jobs": pattern})


def test_a_replayed_forge_delivery_triggers_nothing(world: World) -> None:
    mallorys_project(world, "replay")
    assert call(world, "PUT", "/projects/replay/jobsets/main", MALLORY,
                json={"state": "enabled"}).status_code == 200
    hook = call(world, "POST", "/projects/replay/webhooks", MALLORY,
                json={"forge_type": "github", "secret": HOOK_SECRET})
    assert hook.status_code == 201, hook.text

    def deliver(delivery: str | None, after: str) -> requests.Response:
        body = json.dumps({"ref": "refs/heads/main", "before": "0" * 40, "after": after,
                           "repository": {"full_name": "acme/widget",
                                          "default_branch": "main"}}).encode()
        signature = hmac.new(HOOK_SECRET.encode(), body, hashlib.sha256).hexdigest()
        headers = {"X-GitHub-Event": "push", "X-Hub-Signature-256": f"sha256={signature}",
                   "Content-Type": "application/json"}
        if delivery is not None:
            headers["X-GitHub-Delivery"] = delivery
        return requests.post(world.api + "/webhooks/replay/github", data=body, timeout=10,
                             headers=headers)

    first = deliver("delivery-1", "a" * 40)
    assert first.status_code == 200, first.text
    assert first.json()["action"] == "triggered"
    evaluations = evaluation_ids(world)
    # the signature covers the body only: the captured body under another delivery id,
    # or under none, is the same delivery
    for delivery in ("delivery-1", "delivery-1-again", None):
        replayed = deliver(delivery, "a" * 40)
        assert replayed.status_code == 200, replayed.text
        assert replayed.json()["action"] == "duplicate", delivery
        assert replayed.json()["evaluations"] == []
    assert evaluation_ids(world) == evaluations
    audit = call(world, "GET", "/admin/audit-log?action=webhook.receive", ADMIN).json()
    assert [a["details"]["delivery"] for a in audit["items"]
            if a["target"] == "project:replay/webhook:github"] == ["delivery-1"]
    # a new delivery id is a new delivery
    wait_until(lambda: all_finished(world), timeout=60,
               message="the first evaluation to end")
    assert deliver("delivery-2", "b" * 40).json()["action"] == "triggered"


def evaluation_ids(world: World) -> list[int]:
    answer = call(world, "GET", "/evaluations?limit=100", ADMIN)
    assert answer.status_code == 200, answer.text
    return sorted(e["id"] for e in answer.json()["items"]
                  if e["trigger_kind"] == "webhook")


def all_finished(world: World) -> bool:
    answer = call(world, "GET", "/evaluations?limit=100", ADMIN).json()
    return all(e["status"] not in ("pending", "running") for e in answer["items"])

