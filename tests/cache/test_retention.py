"""Retention removes cache entries of unrooted paths, and only those."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from sqlalchemy import select, text, update
from sqlalchemy.orm import Session, sessionmaker

import celeryconfig
from circus.cache.publish import publish_outputs
from circus.cache.retention import remove_unrooted
from circus.cache.s3 import S3Store
from circus.common.celery import create_celery_app
from circus.common.config import Settings
from circus.common.enums import EvaluationStatus, TriggerKind
from circus.common.models import Channel, Evaluation, EvaluationBuild, Jobset, Project
from circus.common.models import NarInfo as NarInfoRow
from tests.cache.support import Built, closure_expr, make_build, nix_build, simple_expr
from tests.conftest import S3Server


def age_rows(session: Session, seconds: int = 7200) -> None:
    session.execute(update(NarInfoRow).values(
        created_at=text(f"now() - interval '{seconds} seconds'")))


def evaluation(session: Session, jobset: Jobset,
               status: EvaluationStatus = EvaluationStatus.completed) -> Evaluation:
    row = Evaluation(jobset_id=jobset.id, trigger_kind=TriggerKind.manual, status=status)
    session.add(row)
    session.flush()
    return row


def published(session: Session, settings: Settings, built: Built, ev: Evaluation,
              job: str, keep: bool = False) -> int:
    build = make_build(session, built, evaluation=ev, job=job, keep=keep)
    session.add(EvaluationBuild(evaluation_id=ev.id, build_id=build.id, is_new=True))
    publish_outputs(session, settings, build.id)
    return build.id


def cached(session: Session) -> set[str]:
    return set(session.scalars(select(NarInfoRow.store_path)))


def test_retention_keeps_rooted_closures_and_removes_the_rest(
        db: Session, cache_settings: Callable[..., Settings], nonce: str) -> None:
    settings = cache_settings()
    project = Project(name="retained")
    db.add(project)
    db.flush()
    main = Jobset(project_id=project.id, name="main", keep_nr=2)
    other = Jobset(project_id=project.id, name="other", keep_nr=1)
    db.add_all([main, other])
    db.flush()

    # main: four evaluations, keep_nr = 2; the oldest build is kept by hand
    builds = {name: nix_build(simple_expr(nonce, body=name))
              for name in ("m1", "m2", "m3", "m4", "o1", "o2", "running")}
    # m2's output depends on a path that the newest evaluation's output also references
    shared = nix_build(closure_expr(nonce + "-m2", blob_kib=1))
    evs = [evaluation(db, main) for _ in range(4)]
    published(db, settings, builds["m1"], evs[0], "a", keep=True)
    published(db, settings, builds["m2"], evs[1], "a")
    published(db, settings, shared, evs[1], "shared")
    published(db, settings, builds["m3"], evs[2], "a")
    published(db, settings, builds["m4"], evs[3], "a")
    # the failed evaluation after them does not push the others out of keep_nr
    evaluation(db, main, EvaluationStatus.failed)
    # other: keep_nr = 1, but the channel still points at its older evaluation
    o1, o2 = evaluation(db, other), evaluation(db, other)
    published(db, settings, builds["o1"], o1, "a")
    published(db, settings, builds["o2"], o2, "a")
    db.add(Channel(project_id=project.id, name=f"chan-{nonce}", jobset_id=other.id,
                   evaluation_id=o1.id))
    # a path whose build belongs to a running evaluation
    running = evaluation(db, other, EvaluationStatus.running)
    published(db, settings, builds["running"], running, "a")
    # m4 (newest) references shared's dependency through its rows: link it by hand
    dep = Path(shared.outputs["out"], "dep-path").read_text().strip()
    db.execute(update(NarInfoRow).where(
        NarInfoRow.store_path == builds["m4"].outputs["out"]).values(references=[dep]))
    age_rows(db)
    db.flush()
    before = cached(db)
    files_before = {r.store_path: Path(settings.cache.cache_dir, r.url)
                    for r in db.scalars(select(NarInfoRow))}

    result = remove_unrooted(db, settings)
    out = lambda name: builds[name].outputs["out"]  # noqa: E731
    gone = {out("m2"), shared.outputs["out"], shared.outputs["doc"]}
    assert set(result.removed_paths) == gone
    assert cached(db) == before - gone
    assert {out(n) for n in ("m1", "m3", "m4", "o1", "o2", "running")} | {dep} <= cached(db)
    for path, file in files_before.items():
        assert file.exists() == (path not in gone), path

    # a second run finds nothing more; a young row is never removed
    assert remove_unrooted(db, settings).removed_paths == []
    newest = evaluation(db, main)
    published(db, settings, nix_build(simple_expr(nonce, body="m5")), newest, "a")
    published(db, settings, nix_build(simple_expr(nonce, body="m6")), evaluation(db, main),
              "a")
    db.execute(update(NarInfoRow).where(NarInfoRow.store_path == out("m3")).values(
        created_at=text("now()")))
    result = remove_unrooted(db, settings)
    assert out("m3") not in result.removed_paths
    assert out("m4") in result.removed_paths
    assert dep in result.removed_paths


def test_retention_spares_shared_files_and_sweeps_orphans(
        db: Session, cache_settings: Callable[..., Settings], nonce: str) -> None:
    settings = cache_settings(cache={"retention_grace_secs": 0})
    # same contents under two names: two rows, one NAR file
    def twin(name: str) -> Built:
        return nix_build(f'derivation {{ name = "circus-twin-{name}-{nonce}"; '
                         'builder = "/bin/sh"; system = builtins.currentSystem; '
                         f'args = ["-c" "echo same contents {nonce} > $out"]; }}')

    twin_a, twin_b = twin("a"), twin("b")
    build_a = make_build(db, twin_a, project="twins", job="a")
    build_b = make_build(db, twin_b, project="twins", job="b", keep=True)
    publish_outputs(db, settings, build_a.id)
    publish_outputs(db, settings, build_b.id)
    rows = {r.store_path: r.url for r in db.scalars(select(NarInfoRow))}
    assert len(set(rows.values())) == 1
    orphan = Path(settings.cache.cache_dir, "nar", "3" * 52 + ".nar.zst")
    orphan.write_bytes(b"left behind by a crashed publish")
    # build a's evaluation no longer counts among its jobset's newest completed ones
    db.execute(update(Evaluation).values(status=EvaluationStatus.failed))
    age_rows(db, 10)
    result = remove_unrooted(db, settings)
    assert result.removed_paths == [twin_a.outputs["out"]]
    assert result.removed_files == 0
    assert Path(settings.cache.cache_dir, rows[twin_b.outputs["out"]]).exists()
    assert result.orphan_files == 1
    assert not orphan.exists()


def test_retention_task_removes_s3_objects(
        committed_db: sessionmaker[Session], cache_settings: Callable[..., Settings],
        s3_server: S3Server, nonce: str) -> None:
    settings = cache_settings(cache_upload=s3_server.upload_settings(f"gc-{nonce}"),
                              cache={"retention_grace_secs": 0})
    built = nix_build(simple_expr(nonce))
    with committed_db.begin() as session:
        build = make_build(session, built)
        publish_outputs(session, settings, build.id)
        session.execute(update(Evaluation).values(status=EvaluationStatus.cancelled))
        (row,) = session.scalars(select(NarInfoRow))
    store = S3Store(settings.cache_upload)
    assert store.exists(row.url)

    app = create_celery_app(settings)
    try:
        assert "cache-retention" in celeryconfig.beat_schedule(settings)
        assert celeryconfig.beat_schedule(settings)["cache-retention"]["task"] == \
            "circus.cache.tasks.retention"
        outcome = app.tasks["circus.cache.tasks.retention"].apply().get()
    finally:
        app.circus.engine.dispose()
    assert outcome["removed_paths"] == 1
    assert outcome["removed_objects"] == 2
    assert not store.exists(row.url)
    assert not store.exists(f"{row.hash_part}.narinfo")
    with committed_db() as session:
        assert session.scalars(select(NarInfoRow)).all() == []
