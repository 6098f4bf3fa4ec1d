"""Behaviour of the endpoints backed by the evaluator and queue-runner services.

These need the real ``circus.evaluator.service`` and ``circus.queue_runner.service``
(stubs raising NotImplementedError on the api branch); they pass once those are
merged. The full CLI scenario also needs ``circus-evaluator`` and
``circus-queue-runner`` to evaluate and build.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from circus.common.enums import BuildStatus, EvaluationStatus
from circus.common.models import AuditLog, Build, Evaluation
from tests.api.conftest import Keys, World
from tests.api.live import ADMIN_KEY, live_server
from tests.api.test_openapi import PENDING_MERGE, fuzz
from tests.helpers.daemons import Daemon, circus_command
from tests.helpers.gitrepo import GitRepo


def test_trigger_answers_202_and_converges(client: FlaskClient, admin: dict[str, str],
                                           world: World, db: Session) -> None:
    jobset = world.jobset(world.project())
    db.commit()
    first = client.post("/api/v1/evaluations/trigger", headers=admin,
                        json={"jobset_id": jobset.id})
    assert first.status_code == 202, first.get_json()
    body = first.get_json()
    assert body["status"] in ("pending", "running")
    assert body["trigger_kind"] == "manual"
    again = client.post("/api/v1/evaluations/trigger", headers=admin,
                        json={"project": "proj", "jobset": "main"})
    assert again.get_json()["id"] == body["id"]
    assert db.scalars(select(AuditLog.action).where(
        AuditLog.action == "evaluation.trigger")).all() == ["evaluation.trigger"] * 2
    assert client.post("/api/v1/evaluations/trigger", headers=admin,
                       json={"jobset_id": 987654}).status_code == 404


def test_cancel_evaluation_and_compare(client: FlaskClient, admin: dict[str, str],
                                       world: World, db: Session) -> None:
    jobset = world.jobset(world.project())
    old = world.evaluation(jobset)
    world.build(old, "kept", BuildStatus.succeeded)
    world.build(old, "gone", BuildStatus.succeeded)
    new = world.evaluation(jobset)
    world.build(new, "kept", BuildStatus.succeeded)
    world.build(new, "added")
    comparison = client.get(f"/api/v1/evaluations/{new.id}/compare?to={old.id}",
                            headers=admin).get_json()
    assert comparison["new_jobs"] == ["added"]
    assert comparison["removed_jobs"] == ["gone"]
    running = world.evaluation(world.jobset(world.project("p2")), EvaluationStatus.pending)
    pending_build = world.build(running, "x")
    response = client.post(f"/api/v1/evaluations/{running.id}/cancel", headers=admin)
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["status"] == "cancelled"
    db.expire_all()
    build = db.get(Build, pending_build.id)
    assert build is not None
    assert build.status is BuildStatus.cancelled


def test_build_actions(client: FlaskClient, admin: dict[str, str], world: World,
                       db: Session) -> None:
    evaluation = world.evaluation(world.jobset(world.project()))
    pending = world.build(evaluation, "p")
    failed = world.build(evaluation, "f", BuildStatus.failed)
    bumped = client.post(f"/api/v1/builds/{pending.id}/bump", headers=admin).get_json()
    assert bumped["priority"] > 0
    kept = client.put(f"/api/v1/builds/{failed.id}/keep/true", headers=admin).get_json()
    assert kept["keep"] is True
    assert client.put(f"/api/v1/builds/{failed.id}/keep/false", headers=admin).get_json()[
        "keep"] is False
    restarted = client.post(f"/api/v1/builds/{failed.id}/restart", headers=admin)
    assert restarted.get_json()["status"] == "pending"
    assert client.post(f"/api/v1/builds/{pending.id}/restart", headers=admin).status_code == 409
    cancelled = client.post(f"/api/v1/builds/{pending.id}/cancel", headers=admin)
    assert cancelled.get_json()["status"] == "cancelled"
    assert client.post(f"/api/v1/builds/{pending.id}/cancel", headers=admin).status_code == 409


def test_action_operations_conform_to_the_document(app: Flask, world: World, keys: Keys
                                                   ) -> None:
    assert fuzz(app, world, keys, lambda label: label in PENDING_MERGE) == len(PENDING_MERGE)


FLAKE = """{
  outputs = { self }: let
    system = "x86_64-linux";
    job = name: script: derivation {
      inherit name system; builder = "/bin/sh";
      args = [ "-c" "export PATH=/usr/bin:/bin; ${script}" ];
    };
  in {
    hydraJobs = {
      one = job "one-NONCE" "echo one > $out";
      two = job "two-NONCE" "echo two > $out";
    };
  };
}
"""


def test_cli_full_scenario_with_wait(engine: Engine, database_url: str, redis_url: str,
                                     tmp_path: Path, git_repo: Callable[..., GitRepo],
                                     nonce: str, nix_env: dict[str, str]) -> None:
    repo = git_repo("flake")
    repo.commit({"flake.nix": FLAKE.replace("NONCE", nonce[:12])})
    with live_server(engine, database_url, redis_url, tmp_path) as server:
        daemons = [Daemon(name, [circus_command(name)], tmp_path / "daemon-logs",
                          env=server.env).start()
                   for name in ("circus-evaluator", "circus-queue-runner")]
        try:
            def admin(*args: str) -> subprocess.CompletedProcess[str]:
                return subprocess.run(
                    [circus_command("circus-admin"), "--url", server.url, "--api-key",
                     ADMIN_KEY, *args], capture_output=True, text=True, timeout=600)

            assert admin("projects", "create", "flake", "--repository-url",
                         repo.url).returncode == 0
            assert admin("jobsets", "create", "--project", "flake", "main", "--branch",
                         "main").returncode == 0
            waited = admin("--json", "evaluations", "trigger", "main", "--project", "flake",
                           "--wait", "--wait-timeout", "300", "--interval", "0.5")
            logs = "\n".join(d.log()[-3000:] for d in daemons)
            assert waited.returncode == 0, waited.stderr + logs
            assert "builds: 2/2 finished, 0 failed" in waited.stderr
            result = json.loads(waited.stdout)
            assert sorted(b["job_name"] for b in result["builds"]) == ["one", "two"]
            listed = json.loads(admin("--json", "builds", "list", "--status",
                                      "succeeded").stdout)
            assert len(listed) == 2
            restarted = admin("--json", "builds", "restart", str(listed[0]["id"]))
            assert restarted.returncode == 0, restarted.stderr
            assert json.loads(restarted.stdout)["status"] in ("pending", "running",
                                                              "succeeded")
            with Session(engine) as session:
                evaluation = session.scalar(select(Evaluation))
                assert evaluation is not None
                assert evaluation.commit_hash == repo.head()
        finally:
            for daemon in daemons:
                daemon.stop()
