"""Post-processing of succeeded builds is durable: a failed try is retried until done.

The transaction that finishes a build writes its ``pending_postprocessing`` row; only
the post-processing that published the outputs, rooted them and recorded the closure
size deletes it. Real failures: a cache directory that cannot be created, and the
database stopped (``pg_ctl stop -m fast``) while the post-processor works.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from circus.cli.migrate import upgrade
from circus.common.config import Settings
from circus.common.db import normalise_url
from circus.common.localservices import PrivatePostgres
from circus.queue_runner.builds.postprocess import PostProcessor
from circus.queue_runner.builds.results import BuildsReport
from circus.queue_runner.steps.outcomes import FinishReport
from tests.helpers.daemons import wait_until
from tests.queue_runner.conftest import Driver
from tests.queue_runner.factories import instantiate, make_builds

RETRY = {"postprocess_retry_secs": 1, "postprocess_retry_max_secs": 2}


def _state(factory: sessionmaker[Session], build_id: int) -> dict[str, Any]:
    with factory() as session:
        pending = session.execute(text(
            "SELECT attempts, last_error FROM pending_postprocessing WHERE build_id = :b"),
            {"b": build_id}).first()
        outputs = session.execute(text(
            "SELECT path FROM build_outputs WHERE build_id = :b"), {"b": build_id}
        ).scalars().all()
        published = session.execute(text(
            "SELECT count(*) FROM narinfo_cache WHERE store_path = ANY(:p)"),
            {"p": list(outputs)}).scalar_one()
        size = session.execute(text("SELECT closure_size FROM builds WHERE id = :b"),
                               {"b": build_id}).scalar_one()
    return {"pending": None if pending is None else tuple(pending), "outputs": list(outputs),
            "published": published, "closure_size": size}


def _build_one(run: Driver, factory: sessionmaker[Session], nonce: str,
               nix_env: dict[str, str]) -> int:
    drvs = instantiate(["base"], nonce, nix_env)
    with factory() as session:
        build = make_builds(session, drvs)["base"]
    assert run.run([build.id])[build.id].name == "succeeded"
    return build.id


def test_a_failed_publish_is_retried_with_back_off(
        driver: Callable[..., Driver], committed_db: sessionmaker[Session],
        nix_env: dict[str, str], nonce: str, tmp_path: Path) -> None:
    # a cache directory below a plain file cannot be made, not even by root
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    run = driver(queue_runner=RETRY, cache={"cache_dir": str(blocker / "cache")})
    build_id = _build_one(run, committed_db, nonce, nix_env)
    # the finishing transaction wrote the row
    assert _state(committed_db, build_id)["pending"] == (0, None)

    post = PostProcessor(run.settings, committed_db)
    outputs = _state(committed_db, build_id)["outputs"]
    post.process({build_id: outputs})   # the in-process try, right after the build
    state = _state(committed_db, build_id)
    assert state["published"] == 0
    # noted for the retry; the in-process try is not counted as one
    assert state["pending"] is not None
    assert state["pending"][0] == 0
    assert state["pending"][1]

    blocker.unlink()
    # not due yet: the retry waits for postprocess_retry_secs after the finish
    with committed_db() as session:
        session.execute(text("UPDATE pending_postprocessing SET not_before = now() + "
                             "interval '1 hour' WHERE build_id = :b"), {"b": build_id})
        session.commit()
    assert post.retry_due() == 0
    with committed_db() as session:
        session.execute(text("UPDATE pending_postprocessing SET not_before = now() "
                             "WHERE build_id = :b"), {"b": build_id})
        session.commit()
    assert post.retry_due() == 1
    state = _state(committed_db, build_id)
    assert state["published"] == len(outputs) == 1
    assert state["pending"] is None
    assert (state["closure_size"] or 0) > 0
    # idempotent: nothing due any more, and doing it again changes nothing
    assert post.retry_due() == 0
    post.process({build_id: outputs})
    assert _state(committed_db, build_id)["published"] == 1


def test_restarted_builds_and_used_up_attempts_are_dropped(
        driver: Callable[..., Driver], committed_db: sessionmaker[Session],
        nix_env: dict[str, str], nonce: str) -> None:
    run = driver(queue_runner={**RETRY, "postprocess_max_attempts": 2})
    first = _build_one(run, committed_db, nonce + "a", nix_env)
    second = _build_one(run, committed_db, nonce + "b", nix_env)
    with committed_db() as session:
        session.execute(text("UPDATE pending_postprocessing SET not_before = now()"))
        session.execute(text("UPDATE pending_postprocessing SET attempts = 2 "
                             "WHERE build_id = :b"), {"b": first})
        # a restart: the build is queued again, its post-processing is for later
        session.execute(text("UPDATE builds SET status = 0 WHERE id = :b"), {"b": second})
        session.commit()
    post = PostProcessor(run.settings, committed_db)
    assert post.retry_due() == 0
    assert _state(committed_db, first)["pending"] is None
    assert _state(committed_db, second)["pending"] is None
    assert _state(committed_db, first)["published"] == 0


def test_builds_finished_before_postgres_stopped_are_published_after_it_is_back(
        qr_settings: Callable[..., Settings], own_postgres: PrivatePostgres,
        nix_env: dict[str, str], nonce: str) -> None:
    own_postgres.create_database("circus")
    url = own_postgres.url("circus")
    upgrade(url)
    engine = create_engine(normalise_url(url), poolclass=NullPool)
    factory = sessionmaker(bind=engine, expire_on_commit=False)
    settings = qr_settings(database={"url": url}, queue_runner=RETRY)
    run = Driver(settings, factory)
    build_id = _build_one(run, factory, nonce, nix_env)
    outputs = _state(factory, build_id)["outputs"]

    post = PostProcessor(settings, factory, gather_secs=0.2, retry_poll_secs=0.5).start()
    try:
        own_postgres.stop()   # pg_ctl stop -m fast
        # what the step holder hands over after the finishing transaction committed
        post.submit(FinishReport(builds=BuildsReport(succeeded={build_id: outputs})))
        wait_until(lambda: post.batches == 1 and post.idle.is_set(), timeout=30,
                   message="the in-process try (failing: no database)")
        time.sleep(1.5)   # retries come due and fail too
        own_postgres.start()
        wait_until(lambda: _state(factory, build_id)["pending"] is None, timeout=30,
                   interval=0.2, message="the post-processing retried")
    finally:
        post.stop()
        engine.dispose()
    state = _state(factory, build_id)
    assert state["published"] == 1
    assert (state["closure_size"] or 0) > 0
    assert post.retried >= 1
    roots = [Path(settings.gc.gc_roots_dir) / os.path.basename(p) for p in outputs]
    assert all(root.is_symlink() for root in roots)


def test_a_batch_waits_while_the_builders_are_busy(
        driver: Callable[..., Driver], committed_db: sessionmaker[Session],
        nix_env: dict[str, str], nonce: str) -> None:
    """Publishing takes the cores the builds need: a batch is handled once the host's
    slots are idle (``busy`` says False), not while they build."""
    run = driver()
    build_id = _build_one(run, committed_db, nonce, nix_env)
    outputs = _state(committed_db, build_id)["outputs"]
    building = threading.Event()
    building.set()
    asked = threading.Semaphore(0)

    def busy() -> bool:
        asked.release()
        return building.is_set()

    post = PostProcessor(run.settings, committed_db, gather_secs=0.0, busy=busy).start()
    try:
        post.submit(FinishReport(builds=BuildsReport(succeeded={build_id: outputs})))
        for _ in range(3):   # it looked three times while the slots were building
            assert asked.acquire(timeout=30)
        assert post.batches == 0
        assert _state(committed_db, build_id)["pending"] == (0, None)
        building.clear()
        wait_until(lambda: _state(committed_db, build_id)["pending"] is None, timeout=30,
                   interval=0.1, message="the batch handled once the slots are idle")
    finally:
        post.stop()
    assert post.batches == 1
    assert _state(committed_db, build_id)["published"] == 1
