"""What the API does differently to stay fast at a million builds: stored status counts
of settled evaluations, estimated totals of long lists, search through indexes, and
aggregates reused for a few seconds."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
from flask.testing import FlaskClient
from sqlalchemy import Engine, event, text, update
from sqlalchemy.orm import Session, sessionmaker

from circus.common import counting
from circus.common.config import Settings
from circus.common.enums import BuildStatus, EvaluationStatus
from circus.common.models import Build, EvaluationBuild
from circus.server.aggregates import AggregateCache
from circus.server.app import create_app
from tests.api.conftest import Keys, World


def stored_counts(engine: Engine, evaluation_id: int) -> object:
    """(counts of finished builds, ids of unfinished ones) stored on the evaluation."""
    with engine.connect() as conn:
        row = conn.execute(text("SELECT status_counts, unfinished_build_ids FROM evaluations "
                                "WHERE id = :id"), {"id": evaluation_id}).one()
    return None if row[0] is None else tuple(row)


def test_counts_stored_on_settled_evaluations_stay_right_after_a_restart(
        committed_db: sessionmaker[Session], api_settings: Settings, engine: Engine) -> None:
    with committed_db() as db:
        world = World(db)
        jobset = world.jobset(world.project())
        first = world.evaluation(jobset)
        ok = world.build(first, "ok", BuildStatus.succeeded)
        bad = world.build(first, "bad", BuildStatus.failed)
        world.build(first, "worse", BuildStatus.failed)
        # a later evaluation reuses two of the builds
        second = world.evaluation(jobset)
        for build in (ok, bad):
            db.add(EvaluationBuild(evaluation_id=second.id, build_id=build.id, is_new=False))
        running = world.evaluation(jobset, EvaluationStatus.running)
        world.build(running, "new", BuildStatus.succeeded)
        db.commit()
        admin = Keys(db).headers()
        first_id, second_id, running_id, bad_id = first.id, second.id, running.id, bad.id
        jobset_id = jobset.id
    client = create_app(api_settings, engine=engine).test_client()

    def counts(evaluation_id: int) -> dict[str, int]:
        response = client.get(f"/api/v1/evaluations/{evaluation_id}", headers=admin)
        assert response.status_code == 200
        return response.get_json()["build_counts"]  # type: ignore[no-any-return]

    assert counts(first_id) == {"succeeded": 1, "failed": 2}
    assert counts(second_id) == {"succeeded": 1, "failed": 1}
    assert stored_counts(engine, first_id) == ({"2": 1, "3": 2}, [])
    assert stored_counts(engine, second_id) == ({"2": 1, "3": 1}, [])
    # an evaluation still running is counted, never stored
    assert counts(running_id) == {"succeeded": 1}
    assert stored_counts(engine, running_id) is None

    listing = client.get(f"/api/v1/evaluations?jobset_id={jobset_id}",
                         headers=admin).get_json()
    assert {e["id"]: e["build_counts"] for e in listing["items"]} == {
        running_id: {"succeeded": 1}, second_id: {"succeeded": 1, "failed": 1},
        first_id: {"succeeded": 1, "failed": 2}}

    restarted = client.post(f"/api/v1/builds/{bad_id}/restart", headers=admin)
    assert restarted.status_code == 200, restarted.get_json()
    # both evaluations holding the build forgot their counts, and count it pending
    assert stored_counts(engine, first_id) is None
    assert stored_counts(engine, second_id) is None
    assert counts(first_id) == {"succeeded": 1, "failed": 1, "pending": 1}
    assert counts(second_id) == {"succeeded": 1, "pending": 1}
    # stored again: the finished builds counted, the restarted one to look up
    assert stored_counts(engine, first_id) == ({"2": 1, "3": 1}, [bad_id])
    assert counts(first_id) == {"succeeded": 1, "failed": 1, "pending": 1}

    # the build finishes (as the queue runner writes it): stored again, right
    with committed_db() as db:
        db.execute(update(Build).where(Build.id == bad_id).values(status=BuildStatus.succeeded))
        db.commit()
    assert counts(first_id) == {"succeeded": 2, "failed": 1}
    assert stored_counts(engine, first_id) == ({"2": 2, "3": 1}, [])
    # a stored figure is what the next reader gets (no row changed since)
    assert counts(first_id) == {"succeeded": 2, "failed": 1}


def test_a_restart_waits_for_counts_being_stored_and_then_resets_them(
        committed_db: sessionmaker[Session], engine: Engine) -> None:
    """The row lock is what keeps a concurrent store from leaving stale counts."""
    with committed_db() as db:
        world = World(db)
        evaluation = world.evaluation(world.jobset(world.project()))
        build = world.build(evaluation, "job", BuildStatus.failed)
        db.commit()
        evaluation_id, build_id = evaluation.id, build.id
    storing = engine.connect()
    storing.execute(text("SELECT id FROM evaluations WHERE id = :id FOR UPDATE"),
                    {"id": evaluation_id})
    storing.execute(text("UPDATE evaluations SET status_counts = '{\"3\": 1}' WHERE id = :id"),
                    {"id": evaluation_id})
    restart = threading.Thread(target=lambda: _set_status(engine, build_id, BuildStatus.pending))
    restart.start()
    time.sleep(0.3)
    assert restart.is_alive(), "the restart did not wait for the evaluation's row"
    storing.commit()
    storing.close()
    restart.join(10)
    assert stored_counts(engine, evaluation_id) is None


def _set_status(engine: Engine, build_id: int, status: BuildStatus) -> None:
    with engine.begin() as conn:
        conn.execute(update(Build).where(Build.id == build_id).values(status=status))


def test_long_lists_estimate_their_total(client: FlaskClient, admin: dict[str, str],
                                         world: World, db: Session,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(counting, "EXACT_UP_TO", 3)
    # a job name filter: no rollup holds its total (see build_total), the list is counted
    jobset = world.jobset(world.project())
    for n in range(6):
        world.build(world.evaluation(jobset), "job",
                    BuildStatus.succeeded if n else BuildStatus.failed)
    db.commit()
    db.execute(text("ANALYZE builds"))
    long = client.get("/api/v1/builds?limit=2&job_name=job", headers=admin).get_json()
    assert long["total_exact"] is False
    assert long["total"] >= 4
    short = client.get("/api/v1/builds?job_name=job&status=failed", headers=admin).get_json()
    assert (short["total"], short["total_exact"]) == (1, True)
    # an estimate far beyond the bound is answered without counting
    monkeypatch.setattr(counting, "EXACT_UP_TO", 1)
    seen: list[str] = []
    event.listen(db.get_bind(), "before_cursor_execute",
                 lambda *args: seen.append(args[2]))
    far = client.get("/api/v1/builds?limit=2&job_name=job", headers=admin).get_json()
    assert (far["total"], far["total_exact"]) == (6, False)
    assert any(s.startswith("EXPLAIN") for s in seen)
    assert not [s for s in seen if s.startswith("SELECT count(*)")]


def test_search_finds_jobs_by_substring_and_store_paths_by_prefix(
        client: FlaskClient, admin: dict[str, str], world: World, db: Session) -> None:
    evaluation = world.evaluation(world.jobset(world.project()))
    world.build(evaluation, "hello-world", outputs={"out": "/nix/store/abcdefgh12-hello"})
    world.build(evaluation, "world_peace")
    world.build(evaluation, "worldXpeace")
    db.commit()

    def found(q: str) -> dict[str, list[str]]:
        result = client.get("/api/v1/search", query_string={"q": q}, headers=admin).get_json()
        return {kind: [hit["name"] for hit in result[kind]]
                for kind in ("jobs", "store_paths")}

    assert sorted(found("ORLD")["jobs"]) == ["hello-world", "worldXpeace", "world_peace"]
    # LIKE's wildcards in the query are matched literally
    assert found("d_p")["jobs"] == ["world_peace"]
    assert found("abcdefgh1")["store_paths"] == ["/nix/store/abcdefgh12-hello"]
    assert found("bcdefgh1")["store_paths"] == []


def test_job_search_hits_each_jobset_with_its_newest_build(
        client: FlaskClient, admin: dict[str, str], world: World, db: Session) -> None:
    project = world.project()
    main, staging = world.jobset(project), world.jobset(project, "staging")
    old = world.build(world.evaluation(main), "pkgs.hello")
    new = world.build(world.evaluation(main), "pkgs.hello")
    other = world.build(world.evaluation(staging), "pkgs.hello")
    db.commit()
    hits = client.get("/api/v1/search?q=HELLO", headers=admin).get_json()["jobs"]
    assert [(h["jobset_id"], h["build_id"]) for h in hits] == [(main.id, new.id),
                                                               (staging.id, other.id)]
    assert old.id not in [h["build_id"] for h in hits]


def test_imports_adding_the_same_new_job_name_do_not_wait_for_each_other(
        committed_db: sessionmaker[Session], engine: Engine) -> None:
    """job_names is written by the builds' insert: two jobsets' open import transactions
    adding one new name must not queue behind each other (a unique name would)."""
    with committed_db() as db:
        world = World(db)
        project = world.project()
        evaluations = [world.evaluation(world.jobset(project, name)) for name in ("a", "b")]
        db.commit()
        jobsets = [(e.id, e.jobset_id) for e in evaluations]
    insert = text("INSERT INTO builds (evaluation_id, jobset_id, project_id, job_name, "
                  "drv_path, system) VALUES (:e, :j, :p, 'pkgs.brand-new', :drv, 'x')")
    first, second = engine.connect(), engine.connect()
    try:
        for conn, (eid, jid) in zip((first, second), jobsets, strict=True):
            conn.execute(text("SET LOCAL lock_timeout = '5s'"))
            conn.execute(insert, {"e": eid, "j": jid, "p": project.id,
                                  "drv": f"/nix/store/{eid:032d}-x.drv"})
        first.commit()
        second.commit()
    finally:
        first.close()
        second.close()
    with engine.connect() as conn:
        stored = conn.execute(text("SELECT count(*) FROM job_names "
                                   "WHERE name = 'pkgs.brand-new'")).scalar_one()
    assert stored in (1, 2)
    with committed_db() as db:
        hits = searched_jobs(db, "brand-new")
    assert sorted(h["jobset_id"] for h in hits) == sorted(j for _, j in jobsets)


def searched_jobs(db: Session, q: str) -> list[dict[str, object]]:
    from circus.auth.actor import Actor
    from circus.server.api.queries import search

    return search(db, Actor.system("test"), q, 20)["jobs"]  # type: ignore[no-any-return]


def test_aggregates_are_reused_within_the_ttl_and_refreshed_behind_it(engine: Engine) -> None:
    calls: list[int] = []

    def compute(session: Session) -> int:
        calls.append(1)
        return len(calls)

    with Session(engine) as session:
        assert [AggregateCache(0).get("k", compute, session, engine) for _ in range(2)] == [1, 2]
        calls.clear()
        cache = AggregateCache(0.2)
        assert cache.get("k", compute, session, engine) == 1
        assert cache.get("k", compute, session, engine) == 1
        time.sleep(0.25)
        # older than the TTL: the old answer now, the new one computed in the background
        assert cache.get("k", compute, session, engine) == 1
        wait_for(lambda: len(calls) == 2)
        assert cache.get("k", compute, session, engine) == 2
        time.sleep(0.2 * 10 + 0.05)
        # far too old: computed in the request
        assert cache.get("k", compute, session, engine) == 3


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_counts_of_an_evaluation_with_unfinished_builds_follow_them(
        committed_db: sessionmaker[Session], engine: Engine) -> None:
    from circus.evaluator.counts import status_counts

    with committed_db() as db:
        world = World(db)
        evaluation = world.evaluation(world.jobset(world.project()))
        world.build(evaluation, "a", BuildStatus.succeeded)
        waiting = [world.build(evaluation, f"w{n}").id for n in range(4)]
        db.commit()
        assert status_counts(db, [evaluation.id]) == {evaluation.id: {"succeeded": 1,
                                                                      "pending": 4}}
        assert stored_counts(engine, evaluation.id) == ({"2": 1}, waiting)
        _set_status(engine, waiting[0], BuildStatus.running)
        _set_status(engine, waiting[1], BuildStatus.failed)
        assert status_counts(db, [evaluation.id]) == {evaluation.id: {
            "succeeded": 1, "pending": 2, "running": 1, "failed": 1}}
        # fewer than half finished since: the stored list is still good enough
        assert stored_counts(engine, evaluation.id) == ({"2": 1}, waiting)
        _set_status(engine, waiting[2], BuildStatus.succeeded)
        assert status_counts(db, [evaluation.id]) == {evaluation.id: {
            "succeeded": 2, "pending": 1, "running": 1, "failed": 1}}
        assert stored_counts(engine, evaluation.id) == ({"2": 2, "3": 1},
                                                        [waiting[0], waiting[3]])


def test_compare_counts_shared_builds_and_reads_the_others(world: World, db: Session) -> None:
    from circus.evaluator.service import compare

    jobset = world.jobset(world.project())
    old, new = world.evaluation(jobset), world.evaluation(jobset)
    kept = world.build(old, "kept")
    world.build(old, "changed")
    world.build(old, "removed")
    same_drv = world.build(old, "same-drv")
    db.add(EvaluationBuild(evaluation_id=new.id, build_id=kept.id, is_new=False))
    world.build(new, "changed")
    world.build(new, "added")
    # another build of the same derivation is no change
    copy = Build(evaluation_id=new.id, jobset_id=jobset.id, project_id=jobset.project_id,
                 job_name="same-drv", system="x86_64-linux", drv_path=same_drv.drv_path)
    db.add(copy)
    db.flush()
    db.add(EvaluationBuild(evaluation_id=new.id, build_id=copy.id, is_new=True))
    db.flush()
    comparison = compare(db, new.id, old.id)
    assert comparison.new_jobs == ["added"]
    assert comparison.removed_jobs == ["removed"]
    assert comparison.changed_jobs == ["changed"]
    assert comparison.unchanged_count == 2
    assert compare(db, new.id, new.id).unchanged_count == 4
