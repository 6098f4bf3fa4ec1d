"""Evaluations and builds: lists with filters, details, steps, logs (whole and SSE), products."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
import zstandard
from flask.testing import FlaskClient
from sqlalchemy import event
from sqlalchemy.orm import Session

from circus.common.config import Settings
from circus.common.enums import BuildStatus, EvaluationStatus, StepState
from circus.common.models import (
    Build,
    BuildConstituent,
    BuildDependency,
    BuildProduct,
    BuildStep,
    EvaluationBuild,
    EvaluationError,
    Step,
)
from circus.common.models.base import utcnow
from circus.evaluator.counts import status_counts
from circus.server.api.schemas.builds import BuildSchema, EvaluationSchema
from tests.api.conftest import World


def add_step(db: Session, build_id: int, drv: str, *, log_path: str | None,
             state: StepState = StepState.done, status: BuildStatus | None = BuildStatus.succeeded,
             toplevel: bool = True, nr: int = 1) -> Step:
    step = Step(drv_path=drv, system="x86_64-linux", queue_class="x86_64-linux", state=state,
                status=status if state is StepState.done else None, log_path=log_path)
    db.add(step)
    db.flush()
    db.add(BuildStep(build_id=build_id, step_nr=nr, step_id=step.id, drv_path=drv,
                     is_toplevel=toplevel))
    db.commit()
    return step


def test_evaluations_list_show_and_filters(client: FlaskClient, admin: dict[str, str],
                                           world: World, db: Session) -> None:
    jobset = world.jobset(world.project())
    first = world.evaluation(jobset, commit_hash="a" * 40)
    second = world.evaluation(world.jobset(world.project("other")), EvaluationStatus.failed,
                              error_message="boom")
    world.build(first, "ok", BuildStatus.succeeded)
    world.build(first, "bad", BuildStatus.failed)
    world.build(first, "wait")
    db.add(EvaluationError(evaluation_id=first.id, job_name="broken", message="attribute missing"))
    db.commit()

    listing = client.get("/api/v1/evaluations", headers=admin).get_json()
    assert [e["id"] for e in listing["items"]] == [second.id, first.id]
    only = client.get(f"/api/v1/evaluations?jobset_id={jobset.id}", headers=admin).get_json()
    assert [e["id"] for e in only["items"]] == [first.id]
    assert only["items"][0]["build_counts"] == {"succeeded": 1, "failed": 1, "pending": 1}
    failed = client.get("/api/v1/evaluations?status=failed", headers=admin).get_json()
    assert [e["id"] for e in failed["items"]] == [second.id]
    by_project = client.get(f"/api/v1/evaluations?project_id={jobset.project_id}",
                            headers=admin).get_json()
    assert by_project["total"] == 1
    assert client.get("/api/v1/evaluations?status=bogus", headers=admin).status_code == 400

    detail = client.get(f"/api/v1/evaluations/{first.id}", headers=admin).get_json()
    assert detail["errors"] == [{"job_name": "broken", "message": "attribute missing"}]
    assert detail["commit_hash"] == "a" * 40
    assert detail["project_id"] == jobset.project_id


def test_deep_offsets_give_the_same_pages(client: FlaskClient, admin: dict[str, str],
                                          world: World, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    """Offsets beyond DEFERRED_OFFSET find the page's first id first (lowered here so
    a few builds reach it): the same pages, filters applied, an empty one past the end."""
    from circus.server.api import base

    evaluation = world.evaluation(world.jobset(world.project()))
    other = world.evaluation(world.jobset(world.project("other")))
    made = [world.build(evaluation, f"job{n}", BuildStatus.failed if n % 2 else
                        BuildStatus.succeeded) for n in range(7)]
    world.build(other, "elsewhere")

    def pages(query: str) -> list[list[int]]:
        return [[b["id"] for b in client.get(f"/api/v1/builds?limit=2&offset={offset}{query}",
                                             headers=admin).get_json()["items"]]
                for offset in range(0, 9, 2)]

    shallow = pages(f"&evaluation_id={evaluation.id}"), pages("&status=failed")
    monkeypatch.setattr(base, "DEFERRED_OFFSET", 0)
    assert (pages(f"&evaluation_id={evaluation.id}"), pages("&status=failed")) == shallow
    newest = sorted((b.id for b in made), reverse=True)
    assert shallow[0] == [newest[0:2], newest[2:4], newest[4:6], newest[6:7], []]
    failed = [b.id for b in sorted(made, key=lambda b: -b.id) if b.status is BuildStatus.failed]
    assert shallow[1] == [failed[0:2], failed[2:4], [], [], []]


def test_build_lists_filters_and_details(client: FlaskClient, admin: dict[str, str],
                                         world: World) -> None:
    evaluation = world.evaluation(world.jobset(world.project()))
    ok = world.build(evaluation, "ok", BuildStatus.succeeded, outputs={"out": "/nix/store/x-ok"})
    bad = world.build(evaluation, "bad", BuildStatus.failed, system="aarch64-linux")
    world.build(evaluation, "wait")

    def ids(query: str) -> list[int]:
        body = client.get("/api/v1/builds" + query, headers=admin).get_json()
        return [b["id"] for b in body["items"]]

    assert ids(f"?evaluation_id={evaluation.id}&status=succeeded") == [ok.id]
    assert ids("?system=aarch64-linux") == [bad.id]
    assert ids("?job_name=ok") == [ok.id]
    assert len(ids("?finished=false")) == 1
    assert ids("?limit=1&offset=1") == [bad.id]
    # keyset pagination: the cursor of one page leads to the next
    first = client.get("/api/v1/builds?limit=2", headers=admin).get_json()
    assert first["next_cursor"] == bad.id
    rest = client.get(f"/api/v1/builds?limit=2&cursor={first['next_cursor']}",
                      headers=admin).get_json()
    assert [b["id"] for b in rest["items"]] == [ok.id]
    assert rest["next_cursor"] is None
    assert rest["total"] == 3

    body = client.get(f"/api/v1/builds/{ok.id}", headers=admin).get_json()
    assert body["status"] == "succeeded"
    assert body["status_code"] == 2
    assert body["outputs"] == {"out": "/nix/store/x-ok"}
    assert body["finished"] is True
    assert client.get(f"/api/v1/builds/{bad.id}", headers=admin).get_json()["status_code"] == 3


def test_build_list_items_are_what_the_build_schema_dumps(
        client: FlaskClient, admin: dict[str, str], world: World, db: Session) -> None:
    """The lists build their items from columns (circus/server/api/listrows.py): the
    same dictionaries as BuildSchema's dump of the entity, whatever is set."""
    evaluation = world.evaluation(world.jobset(world.project()))
    made = [
        world.build(evaluation, "plain"),
        world.build(evaluation, "full", BuildStatus.failed_with_output, system="aarch64-linux",
                    outputs={"out": "/nix/store/x-full", "dev": "/nix/store/x-full-dev"},
                    started_at=utcnow(), completed_at=utcnow(), error_message="exit 1",
                    required_features=["kvm", "big"], is_aggregate=True, priority=5,
                    retry_count=2, keep=True, closure_size=1234, machine="m1",
                    nix_name="full-1.0", meta_description="d", meta_license="MIT",
                    meta_homepage="https://example.org", meta_maintainers="a, b"),
    ]
    db.commit()
    listed = client.get("/api/v1/builds", headers=admin).get_json()["items"]
    schema = BuildSchema()
    assert listed == [json.loads(json.dumps(schema.dump(db.get(Build, b.id))))
                      for b in reversed(made)]


def test_evaluation_list_items_are_what_the_evaluation_schema_dumps(
        client: FlaskClient, admin: dict[str, str], world: World, db: Session) -> None:
    jobset = world.jobset(world.project())
    made = [
        world.evaluation(jobset, EvaluationStatus.pending),
        world.evaluation(world.jobset(world.project("other")), EvaluationStatus.failed,
                         commit_hash="c" * 40,
                         inputs_hash="i", flake_ref="github:o/r", started_at=utcnow(),
                         finished_at=utcnow(), eval_time=1.5, attrs_total=3, attrs_done=2,
                         builds_new=1, builds_reused=0, error_message="boom",
                         requested_by="alice", pr_number=7, pr_head_branch="h",
                         pr_base_branch="b", pr_action="opened"),
    ]
    world.build(made[1], "ok", BuildStatus.succeeded)
    db.commit()
    listed = client.get("/api/v1/evaluations", headers=admin).get_json()["items"]
    schema = EvaluationSchema()
    expected = []
    for evaluation in reversed(made):
        db.refresh(evaluation)
        evaluation.build_counts = status_counts(  # type: ignore[attr-defined]
            db, [evaluation.id])[evaluation.id]
        expected.append(json.loads(json.dumps(schema.dump(evaluation))))
    assert listed == expected
    assert listed[0]["build_counts"] == {"succeeded": 1}


def test_build_list_totals_are_exact_and_counted_from_rollups(
        client: FlaskClient, admin: dict[str, str], world: World, db: Session) -> None:
    """Totals of the filters the rollup of the builds (or an evaluation's status counts)
    holds are exact without counting the list; the others are counted."""
    jobset = world.jobset(world.project())
    first, second = world.evaluation(jobset), world.evaluation(jobset)
    other = world.evaluation(world.jobset(world.project("other")))
    reused = world.build(first, "reused", BuildStatus.succeeded)
    world.build(first, "bad", BuildStatus.failed, system="aarch64-linux")
    world.build(second, "wait")
    db.add(EvaluationBuild(evaluation_id=second.id, build_id=reused.id, is_new=False))
    world.build(other, "elsewhere", BuildStatus.succeeded)
    db.commit()
    seen: list[str] = []
    event.listen(db.get_bind(), "before_cursor_execute", lambda *args: seen.append(args[2]))
    for query in ("", f"project_id={jobset.project_id}", f"jobset_id={jobset.id}",
                  "status=succeeded", "system=aarch64-linux", "finished=true",
                  "finished=false", f"jobset_id={jobset.id}&status=failed&system=x86_64-linux",
                  f"evaluation_id={second.id}", f"evaluation_id={first.id}&finished=true",
                  f"evaluation_id={second.id}&status=succeeded", "evaluation_id=999999",
                  "job_name=reused", f"evaluation_id={second.id}&system=x86_64-linux"):
        seen.clear()
        page = client.get(f"/api/v1/builds?limit=1&{query}", headers=admin).get_json()
        everything = client.get(f"/api/v1/builds?limit=500&{query}", headers=admin).get_json()
        assert (page["total"], page["total_exact"]) == (len(everything["items"]), True), query
        counted = any(s.startswith("EXPLAIN") for s in seen)
        assert counted == ("job_name" in query or ("system" in query and "evaluation" in query))


def test_recent_and_stats(client: FlaskClient, admin: dict[str, str], world: World) -> None:
    from datetime import timedelta

    from circus.common.models.base import utcnow

    evaluation = world.evaluation(world.jobset(world.project()))
    now = utcnow()
    older = world.build(evaluation, "a", BuildStatus.succeeded, started_at=now - timedelta(60),
                        completed_at=now - timedelta(seconds=30))
    newer = world.build(evaluation, "b", BuildStatus.failed, started_at=now - timedelta(20),
                        completed_at=now)
    world.build(evaluation, "c")
    recent = client.get("/api/v1/builds/recent?limit=5", headers=admin).get_json()
    assert [b["id"] for b in recent] == [newer.id, older.id]
    stats = client.get("/api/v1/builds/stats", headers=admin).get_json()
    assert stats["total"] == 3
    assert stats["by_status"] == {"succeeded": 1, "failed": 1, "pending": 1}
    assert stats["queued"] == 1
    assert stats["failed"] == 1
    assert stats["avg_duration_seconds"] > 0


def test_stats_count_the_steps_still_to_finish(client: FlaskClient, admin: dict[str, str],
                                               world: World, db: Session) -> None:
    build = world.build(world.evaluation(world.jobset(world.project())), "a")
    for nr, state in enumerate([StepState.pending, StepState.queued, StepState.queued,
                                StepState.running, StepState.done, StepState.done], 1):
        add_step(db, build.id, f"/nix/store/{nr:032d}-s.drv", log_path=None, state=state,
                 nr=nr)
    stats = client.get("/api/v1/builds/stats", headers=admin).get_json()
    assert stats["steps_by_state"] == {"pending": 1, "queued": 2, "running": 1}


def test_steps_relations(client: FlaskClient, admin: dict[str, str], world: World,
                         db: Session) -> None:
    evaluation = world.evaluation(world.jobset(world.project()))
    aggregate = world.build(evaluation, "all", is_aggregate=True)
    dep = world.build(evaluation, "lib")
    app = world.build(evaluation, "app")
    db.add_all([BuildConstituent(aggregate_id=aggregate.id, constituent_id=app.id),
                BuildDependency(build_id=app.id, dependency_id=dep.id)])
    db.commit()
    add_step(db, app.id, app.drv_path, log_path=None)
    add_step(db, app.id, dep.drv_path, log_path=None, toplevel=False, nr=2,
             status=BuildStatus.failed)

    def related(build_id: int, kind: str) -> list[int]:
        body = client.get(f"/api/v1/builds/{build_id}/{kind}", headers=admin).get_json()
        return [b["id"] for b in body["items"]]

    assert related(aggregate.id, "constituents") == [app.id]
    assert related(app.id, "dependencies") == [dep.id]
    assert related(dep.id, "dependents") == [app.id]
    steps = client.get(f"/api/v1/builds/{app.id}/steps", headers=admin).get_json()
    assert [(s["step_nr"], s["is_toplevel"], s["status"]) for s in steps] == [
        (1, True, "succeeded"), (2, False, "failed")]
    assert client.get("/api/v1/builds/424242/steps", headers=admin).status_code == 404


def test_whole_log_plain_and_zstd(client: FlaskClient, admin: dict[str, str], world: World,
                                  db: Session, api_settings: Settings) -> None:
    log_dir = Path(api_settings.logs.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    text = "".join(f"line {i}\n" for i in range(20000))
    (log_dir / "a.log.zst").write_bytes(zstandard.ZstdCompressor().compress(text.encode()))
    (log_dir / "b.log").write_text("plain log\n")
    evaluation = world.evaluation(world.jobset(world.project()))
    compressed = world.build(evaluation, "a")
    plain = world.build(evaluation, "b")
    nolog = world.build(evaluation, "c")
    add_step(db, compressed.id, compressed.drv_path, log_path="a.log.zst")
    add_step(db, plain.id, plain.drv_path, log_path=str(log_dir / "b.log"))

    response = client.get(f"/api/v1/builds/{compressed.id}/log", headers=admin)
    assert response.status_code == 200
    assert response.mimetype == "text/plain"
    assert response.get_data(as_text=True) == text
    assert client.get(f"/api/v1/builds/{plain.id}/log", headers=admin).get_data(
        as_text=True) == "plain log\n"
    missing = client.get(f"/api/v1/builds/{nolog.id}/log", headers=admin)
    assert missing.status_code == 404
    assert "no log" in missing.get_json()["error"]


def test_sse_tail_follows_a_growing_log_until_the_step_is_done(
        client: FlaskClient, admin: dict[str, str], world: World, db: Session,
        api_settings: Settings) -> None:
    log_dir = Path(api_settings.logs.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / "running.log"
    log.write_text("first line\npartial")
    build = world.build(world.evaluation(world.jobset(world.project())), "a",
                        BuildStatus.running)
    step = add_step(db, build.id, build.drv_path, log_path="running.log",
                    state=StepState.running)

    response = client.get(f"/api/v1/builds/{build.id}/log/stream", headers=admin,
                          buffered=False)
    assert response.mimetype == "text/event-stream"
    events = iter(response.response)
    assert next(events).decode() == "data: first line\n\n"
    # the build writes more and finishes; the queue runner compresses the final log
    final = "first line\npartial rest\nlast line\n"
    (log_dir / "running.log.zst").write_bytes(zstandard.ZstdCompressor().compress(
        final.encode()))
    step.state = StepState.done
    step.status = BuildStatus.succeeded
    step.log_path = "running.log.zst"
    db.commit()
    rest = b"".join(events).decode()
    response.close()
    assert rest == ("data: partial rest\n\ndata: last line\n\n"
                    "event: end\ndata: succeeded\n\n")


def test_products_download_and_traversal(client: FlaskClient, admin: dict[str, str],
                                         world: World, db: Session, nix_env: dict[str, str],
                                         nonce: str) -> None:
    expr = (f'derivation {{ name = "product-{nonce[:8]}"; builder = "/bin/sh"; system = '
            f'builtins.currentSystem; args = ["-c" "export PATH=/usr/bin:/bin; mkdir -p '
            f'$out/doc; echo tarball > $out/foo.tar.gz; echo manual > $out/doc/index.html"]; }}')
    out = subprocess.run(["nix-build", "--no-out-link", "-E", expr], env=nix_env, check=True,
                         capture_output=True, text=True).stdout.strip()
    build = world.build(world.evaluation(world.jobset(world.project())), "p",
                        BuildStatus.succeeded, outputs={"out": out})
    file_product = BuildProduct(build_id=build.id, type="file", subtype="binary-dist",
                                name="foo.tar.gz", path=f"{out}/foo.tar.gz",
                                sha256=hashlib.sha256(b"tarball\n").hexdigest(), file_size=8)
    doc = BuildProduct(build_id=build.id, type="doc", subtype="manual", name="manual",
                       path=f"{out}/doc", default_path="index.html", is_directory=True)
    escape = BuildProduct(build_id=build.id, type="file", subtype="evil", name="passwd",
                          path=f"{out}/../../../etc/passwd")
    db.add_all([file_product, doc, escape])
    db.commit()
    base = f"/api/v1/builds/{build.id}/products"
    listing = client.get(base, headers=admin).get_json()
    assert [p["name"] for p in listing] == ["foo.tar.gz", "manual", "passwd"]
    response = client.get(f"{base}/{file_product.id}/download", headers=admin)
    assert response.status_code == 200
    assert response.data == b"tarball\n"
    page = client.get(f"{base}/{doc.id}/download", headers=admin)
    assert page.data == b"manual\n"
    assert page.mimetype == "text/html"
    assert client.get(f"{base}/{escape.id}/download", headers=admin).status_code == 403
    sneaky = client.get(f"{base}/{doc.id}/download?path=../../../../etc/passwd", headers=admin)
    assert sneaky.status_code == 400
    absolute = client.get(f"{base}/{doc.id}/download?path=/etc/passwd", headers=admin)
    assert absolute.status_code == 400
    assert client.get(f"{base}/{doc.id}/download?path=missing.html",
                      headers=admin).status_code == 404
    other = world.build(world.evaluation(world.jobset(world.project("q"))), "q")
    assert client.get(f"/api/v1/builds/{other.id}/products/{file_product.id}/download",
                      headers=admin).status_code == 404


def test_sse_tail_sends_keep_alives_while_a_build_is_quiet(
        client: FlaskClient, admin: dict[str, str], world: World, db: Session,
        api_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    from circus.server import logfiles

    # a short idle interval stands in for the 15 s a real stream waits
    monkeypatch.setattr(logfiles, "IDLE_HEARTBEAT", 0.2)
    log_dir = Path(api_settings.logs.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    (log_dir / "quiet.log").write_text("compiling\n")
    build = world.build(world.evaluation(world.jobset(world.project())), "q",
                        BuildStatus.running)
    step = add_step(db, build.id, build.drv_path, log_path="quiet.log",
                    state=StepState.running)
    response = client.get(f"/api/v1/builds/{build.id}/log/stream", headers=admin,
                          buffered=False)
    events = iter(response.response)
    assert next(events).decode() == "data: compiling\n\n"
    # nothing is written: the stream stays alive with comments, not silence
    assert next(events).decode() == ": keep-alive\n\n"
    assert next(events).decode() == ": keep-alive\n\n"
    step.state = StepState.done
    step.status = BuildStatus.succeeded
    db.commit()
    rest = b"".join(events).decode()
    response.close()
    assert rest.endswith("event: end\ndata: succeeded\n\n")
