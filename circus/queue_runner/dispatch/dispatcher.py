"""The dispatcher loop: LISTEN for new builds, step them, publish wake-ups.

The evaluator commits builds with ``pg_notify('circus_builds', <evaluation id>)``;
the dispatcher wakes on the notification (sub-second first dispatch) and also
polls every ``poll_interval`` (a notification sent while it was down is not
lost work: unstepped builds are found by the scan). The same connection
listens on ``circus_gc`` (``set_keep``) to re-sync GC roots promptly.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from circus.common.config import Settings
from circus.common.db import in_transaction
from circus.common.messaging import BUILDS_CHANNEL, GC_CHANNEL
from circus.common.pglisten import Listener
from circus.queue_runner.derivations import DrvCache
from circus.queue_runner.dispatch.stepper import StepReport, step_builds
from circus.queue_runner.routing.wakeups import Publish, publish_after_commit
from circus.queue_runner.steps.outcomes import FinishReport

log = logging.getLogger(__name__)

#: the first batch after a wake-up is small, so its steps start building while the
#: rest of a large evaluation is still being stepped (first dispatch < 1 s)
FIRST_BATCH = 50
#: each further batch is this many times larger (up to ``dispatch_batch_size``): in one
#: 450-build second batch of the 500-derivation DAG, 17 of its 20 chains stayed
#: invisible for the 3-5 s that transaction took (bench/build_overhead.py --e2e),
#: while the slots had three chains to share
BATCH_GROWTH = 4


class Dispatcher(threading.Thread):
    def __init__(self, settings: Settings, factory: sessionmaker[Session], engine: Engine,
                 cache: DrvCache, stop: threading.Event, *, publish: Publish | None,
                 on_classes: Callable[[list[str]], None] | None = None,
                 on_built: Callable[[FinishReport], None] | None = None,
                 on_gc: Callable[[], None] | None = None) -> None:
        super().__init__(name="dispatcher", daemon=True)
        self.settings = settings
        self.factory = factory
        self.cache = cache
        self.stop = stop
        self.publish = publish
        self.on_classes = on_classes
        self.on_built = on_built
        self.on_gc = on_gc
        self.listener = Listener(engine, [BUILDS_CHANNEL, GC_CHANNEL])
        self.stepped = 0

    def run(self) -> None:
        interval = float(self.settings.queue_runner.poll_interval)
        while not self.stop.is_set():
            self.dispatch_pending()
            deadline = time.monotonic() + interval
            while not self.stop.is_set() and time.monotonic() < deadline:
                try:
                    channels = self.listener.wait(min(1.0, deadline - time.monotonic()))
                except Exception:
                    log.warning("lost the LISTEN connection; polling until it is back",
                                exc_info=True)
                    self.listener.close()
                    self.stop.wait(1.0)
                    continue
                if GC_CHANNEL in channels and self.on_gc is not None:
                    self.on_gc()
                if BUILDS_CHANNEL in channels:
                    break
        self.listener.close()

    def dispatch_pending(self) -> int:
        """Step every unstepped build (in batches); returns how many builds were stepped."""
        total = 0
        full = self.settings.queue_runner.dispatch_batch_size
        limit = min(FIRST_BATCH, full)
        while not self.stop.is_set():
            try:
                report = in_transaction(self.factory, functools.partial(self._batch, limit=limit))
            except Exception:
                log.exception("dispatching failed; retrying in %ss",
                              self.settings.queue_runner.poll_interval)
                return total
            total += report.builds
            if report.new_classes and self.on_classes is not None:
                self.on_classes(report.new_classes)
            if report.finished.finished and self.on_built is not None:
                self.on_built(FinishReport(builds=report.finished))
            if report.builds:
                log.info("stepped %d build(s): %d new step(s), %d queued", report.builds,
                         report.new_steps, sum(report.queued.values()))
            if report.builds < limit:
                break
            limit = min(full, limit * BATCH_GROWTH)
        self.stepped += total
        return total

    def _batch(self, session: Session, limit: int) -> StepReport:
        report = step_builds(session, self.settings, self.cache, limit=limit)
        publish_after_commit(session, self.publish, report.queued)
        return report
