"""Work after a build succeeded that must not slow the builders down.

GC roots, the binary cache (unless a required upload decides the build's status,
``results.publishes_inline``) and closure sizes (one ``nix path-info`` for many
builds) are done by a background thread a moment after the build finished;
nothing depends on them to make progress.

Durable: the transaction that finishes a succeeded build also writes its
``pending_postprocessing`` row (``results.finish_builds``), and the row is
deleted only in the transaction that records the build's closure size, after
its outputs are rooted and published. Whatever stops that in between (the
database down for a moment, a failed publish, the queue runner killed with the
build in its in-memory batch) leaves the row, and the post-processor of any queue
runner takes it up again ``postprocess_retry_secs`` after the build finished,
then with doubling back-off (claimed with ``SKIP LOCKED`` and a new
``not_before``, so two runners do not retry one build together). Every part is
idempotent: a root that exists is kept, a published path is not packed again, a
size is overwritten with the same value.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping

from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from circus.cache.publish import PublishResult, publish_builds
from circus.common.config import Settings
from circus.common.db import in_transaction
from circus.common.enums import BuildStatus
from circus.common.nix import store
from circus.queue_runner.builds import gcroots
from circus.queue_runner.builds.results import publishes_inline
from circus.queue_runner.steps.outcomes import FinishReport

log = logging.getLogger(__name__)


def closure_sizes(builds: Mapping[int, list[str]], env: Mapping[str, str]) -> dict[int, int]:
    """Bytes in the closure of each build's outputs."""
    sizes = store.path_infos([p for paths in builds.values() for p in paths], env,
                             closure_size=True)
    found: dict[int, int] = {}
    for build_id, paths in builds.items():
        if not paths or any(p not in sizes for p in paths):
            continue
        if len(paths) == 1:
            if (size := sizes[paths[0]].closure_size) is not None:
                found[build_id] = size
            continue
        # several outputs share most of their closure: measure the union
        try:
            requisites = store.requisites(paths, env, timeout=120)
        except store.StoreError:
            continue
        union = store.path_infos(requisites, env)
        found[build_id] = sum(s.nar_size for s in union.values())
    return found


def record_closure_sizes(session: Session, sizes: Mapping[int, int]) -> None:
    if sizes:
        session.execute(text("""
            UPDATE builds AS b SET closure_size = v.size
            FROM unnest(CAST(:ids AS bigint[]), CAST(:sizes AS bigint[])) AS v(id, size)
            WHERE b.id = v.id
        """), {"ids": list(sizes), "sizes": list(sizes.values())})


def publish_later(factory: sessionmaker[Session], settings: Settings, build_ids: list[int]
                  ) -> dict[int, str]:
    """Publish succeeded builds' outputs to the binary cache: all at once (one Nix
    call), or one savepoint per build when the batch fails. Returns what went wrong
    per build (those are tried again later)."""
    if not (settings.cache.enabled or settings.cache_upload.enabled):
        return {}
    with factory() as session, session.begin():
        try:
            with session.begin_nested():
                return _errors(publish_builds(session, settings, build_ids))
        except Exception:
            log.warning("publishing %d build(s) together failed; one by one now",
                        len(build_ids), exc_info=True)
        errors: dict[int, str] = {}
        for build_id in build_ids:
            try:
                with session.begin_nested():
                    errors.update(_errors(publish_builds(session, settings, [build_id])))
            except Exception as exc:
                # the build stays succeeded; its outputs are just not in the cache yet
                log.exception("build %d: publishing its outputs failed", build_id)
                errors[build_id] = f"publishing failed: {exc}"
        return errors


def _errors(results: Mapping[int, PublishResult]) -> dict[int, str]:
    return {build_id: "; ".join(f"{path}: {error}" for path, error in result.errors.items())
            for build_id, result in results.items() if result.errors}


def claim_due(session: Session, settings: Settings, limit: int = 100
              ) -> dict[int, list[str]]:
    """Pending post-processing that is due, with each build's outputs (a retry).

    Claimed rows get their next ``not_before`` now (doubling back-off), so another
    runner skips them while this one works. Rows of builds that are no longer
    succeeded (restarted since) and rows that used up ``postprocess_max_attempts``
    are dropped.
    """
    runner = settings.queue_runner
    for build_id, error in session.execute(text("""
        DELETE FROM pending_postprocessing
        WHERE attempts >= :max AND not_before <= now()
        RETURNING build_id, last_error
    """), {"max": runner.postprocess_max_attempts}).tuples():
        log.error("build %d: post-processing given up after %d attempts (last error: %s)",
                  build_id, runner.postprocess_max_attempts, error)
    session.execute(text("""
        DELETE FROM pending_postprocessing p USING builds b
        WHERE b.id = p.build_id AND b.status <> :succeeded AND p.not_before <= now()
    """), {"succeeded": int(BuildStatus.succeeded)})
    claimed = session.execute(text("""
        WITH due AS (
            SELECT build_id FROM pending_postprocessing WHERE not_before <= now()
            ORDER BY not_before LIMIT :limit FOR UPDATE SKIP LOCKED
        )
        UPDATE pending_postprocessing AS p SET
            attempts = p.attempts + 1,
            not_before = now() + make_interval(secs => least(:cap, :base * 2 ^ p.attempts))
        FROM due WHERE p.build_id = due.build_id
        RETURNING p.build_id
    """), {"limit": limit, "base": float(runner.postprocess_retry_secs),
           "cap": float(runner.postprocess_retry_max_secs)}).scalars().all()
    if not claimed:
        return {}
    outputs: dict[int, list[str]] = {build_id: [] for build_id in claimed}
    for build_id, path in session.execute(text("""
        SELECT build_id, path FROM build_outputs WHERE build_id = ANY(CAST(:ids AS bigint[]))
        ORDER BY build_id, name
    """), {"ids": sorted(claimed)}).tuples():
        outputs[build_id].append(path)
    return outputs


#: how long the post-processor gathers finished builds before handling them together:
#: each batch costs two ``nix path-info`` calls and a publishing transaction, and it
#: runs on the cores the builds need; at 1 s a 500-derivation DAG made ~30 batches
GATHER_SECS = 3.0
#: while this host builds, finished builds wait up to this long (from the first of a
#: batch) for the builders to go idle: packing, signing and ``nix path-info`` take the
#: cores the builds need (``bench/build_overhead.py --e2e``: ~10 batches per round
#: during the builds), and nothing waits for them to make progress. A busy queue still
#: publishes at least this often
DEFER_MAX_SECS = 60.0
#: how often a deferred batch looks whether the builders went idle
DEFER_POLL_SECS = 0.5


class PostProcessor:
    """A thread that handles succeeded builds in batches, and retries what is pending."""

    def __init__(self, settings: Settings, factory: sessionmaker[Session],
                 gather_secs: float = GATHER_SECS, retry_poll_secs: float | None = None,
                 busy: Callable[[], bool] | None = None,
                 defer_max_secs: float = DEFER_MAX_SECS) -> None:
        self.settings = settings
        self.factory = factory
        #: wait this long after the first build to handle many with one Nix call each
        self.gather_secs = gather_secs
        #: whether this host is building now (then a batch waits, up to ``defer_max_secs``)
        self.busy = busy
        self.defer_max_secs = defer_max_secs
        #: look for due retries this often (between batches, however busy)
        self.retry_poll_secs = retry_poll_secs or min(
            10.0, float(settings.queue_runner.postprocess_retry_secs))
        self.batches = 0
        self.retried = 0
        self._queue: queue.Queue[dict[int, list[str]] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="post-processor", daemon=True)
        self.idle = threading.Event()
        self.idle.set()

    def start(self) -> PostProcessor:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    def submit(self, report: FinishReport) -> None:
        if report.builds.succeeded:
            self.idle.clear()
            self._queue.put(dict(report.builds.succeeded))

    def _run(self) -> None:
        next_retry = time.monotonic() + self.retry_poll_secs
        while True:
            try:
                item = self._queue.get(timeout=max(0.0, next_retry - time.monotonic()))
            except queue.Empty:
                self._retry_due()
                next_retry = time.monotonic() + self.retry_poll_secs
                continue
            if item is None:
                return
            batch = dict(item)
            first = time.monotonic()
            time.sleep(self.gather_secs)
            stop = self._gather(batch)
            while not stop and self.busy is not None and self.busy() \
                    and time.monotonic() - first < self.defer_max_secs:
                time.sleep(DEFER_POLL_SECS)
                stop = self._gather(batch)
            self.batches += 1
            try:
                self.process(batch)
            except Exception:
                # the builds' pending_postprocessing rows stay: retried later
                log.exception("post-processing %d build(s) failed; retried later", len(batch))
            if self._queue.empty():
                self.idle.set()
            if stop:
                return

    def _gather(self, batch: dict[int, list[str]]) -> bool:
        """Add what was submitted meanwhile to ``batch``; True when asked to stop."""
        while True:
            try:
                more = self._queue.get_nowait()
            except queue.Empty:
                return False
            if more is None:
                return True
            batch.update(more)

    def _retry_due(self) -> None:
        try:
            while due := in_transaction(self.factory,
                                        lambda s: claim_due(s, self.settings)):
                log.info("post-processing %d build(s) again", len(due))
                self.retried += len(due)
                self.process(due)
        except Exception:
            log.exception("retrying post-processing failed; retried later")

    def retry_due(self) -> int:
        """Retry due post-processing now (in the caller's thread); returns how many
        builds were tried."""
        before = self.retried
        self._retry_due()
        return self.retried - before

    def process(self, builds: Mapping[int, list[str]]) -> None:
        """Root, publish and measure ``builds`` (id → output paths); their pending rows
        go in the transaction that records the sizes, except for builds whose
        publishing failed (their error is noted for the retry)."""
        if self.settings.gc.enabled:
            gcroots.add_roots(self.settings, [p for paths in builds.values() for p in paths])
        failed: dict[int, str] = {}
        if not publishes_inline(self.settings):
            failed = publish_later(self.factory, self.settings, sorted(builds))
        env = self.settings.nix_environ()
        sizes = closure_sizes(builds, env)

        def record(session: Session) -> None:
            record_closure_sizes(session, sizes)
            session.execute(text("""
                DELETE FROM pending_postprocessing
                WHERE build_id = ANY(CAST(:ids AS bigint[]))
                  AND NOT build_id = ANY(CAST(:failed AS bigint[]))
            """), {"ids": sorted(builds), "failed": sorted(failed)})
            if failed:
                session.execute(text("""
                    UPDATE pending_postprocessing AS p SET last_error = v.error
                    FROM unnest(CAST(:ids AS bigint[]), CAST(:errors AS text[]))
                         AS v(id, error)
                    WHERE p.build_id = v.id
                """), {"ids": list(failed), "errors": list(failed.values())})

        in_transaction(self.factory, record)
