"""Work after a build succeeded that must not slow the builders down.

Closure sizes (one ``nix path-info`` for many builds) and GC roots are
recorded by a background thread a moment after the build finished; nothing
depends on them to make progress.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Mapping

from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from circus.cache.publish import publish_builds
from circus.common.config import Settings
from circus.common.nix import store
from circus.queue_runner import gcroots
from circus.queue_runner.outcomes import FinishReport
from circus.queue_runner.results import publishes_inline

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
                  ) -> None:
    """Publish succeeded builds' outputs to the binary cache: all at once (one Nix
    call), or one savepoint per build when the batch fails."""
    if not (settings.cache.enabled or settings.cache_upload.enabled):
        return
    with factory() as session, session.begin():
        try:
            with session.begin_nested():
                publish_builds(session, settings, build_ids)
            return
        except Exception:
            log.warning("publishing %d build(s) together failed; one by one now",
                        len(build_ids), exc_info=True)
        for build_id in build_ids:
            try:
                with session.begin_nested():
                    publish_builds(session, settings, [build_id])
            except Exception:
                # the build stays succeeded; its outputs are just not in the cache
                log.exception("build %d: publishing its outputs failed", build_id)


#: how long the post-processor gathers finished builds before handling them together:
#: each batch costs two ``nix path-info`` calls and a publishing transaction, and it
#: runs on the cores the builds need; at 1 s a 500-derivation DAG made ~30 batches
GATHER_SECS = 3.0


class PostProcessor:
    """A thread that handles succeeded builds in batches."""

    def __init__(self, settings: Settings, factory: sessionmaker[Session],
                 gather_secs: float = GATHER_SECS) -> None:
        self.settings = settings
        self.factory = factory
        #: wait this long after the first build to handle many with one Nix call each
        self.gather_secs = gather_secs
        self.batches = 0
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
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = dict(item)
            time.sleep(self.gather_secs)
            stop = False
            while True:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                batch.update(more)
            self.batches += 1
            try:
                self.process(batch)
            except Exception:
                log.exception("post-processing %d build(s) failed", len(batch))
            if self._queue.empty():
                self.idle.set()
            if stop:
                return

    def process(self, builds: Mapping[int, list[str]]) -> None:
        if not publishes_inline(self.settings):
            publish_later(self.factory, self.settings, sorted(builds))
        env = self.settings.nix_environ()
        sizes = closure_sizes(builds, env)
        with self.factory() as session, session.begin():
            record_closure_sizes(session, sizes)
        if self.settings.gc.enabled:
            gcroots.add_roots(self.settings, [p for paths in builds.values() for p in paths])
