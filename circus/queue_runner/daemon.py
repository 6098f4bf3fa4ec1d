"""``circus-queue-runner``: dispatcher, reconciler and local build workers in one process.

Threads: the dispatcher (LISTEN/poll → steps → wake-ups), the reconciler
(leases, lost messages, unsupported classes, GC roots), the class watcher
(subscribes the local Celery consumer to new classes it can serve), the
wake-up publisher, the post-processor (closure sizes, GC roots), the SSH
builders (``ssh.pool``, a thread per remote build), the consumers the entry
point hands in (the agent gateway, ``circus.gateway.consumer``) and the
heartbeat. The main thread runs a Celery worker (thread pool,
``queue_runner.workers`` slots) consuming the class queues ``build.<class>``.

SIGTERM: Celery's warm shutdown starts; the stop event makes every running
batch kill its ``nix-store`` (SSH builds: their remote ``nix-store``) and hand
its unfinished steps back (they return to the queue without counting an
attempt), then the process exits.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from celery import signals
from sqlalchemy.orm import Session, sessionmaker

from celeryconfig import build_queue_name
from circus.common import rollups
from circus.common.celery import create_celery_app
from circus.common.config import Settings
from circus.common.db import in_transaction, make_engine, make_session_factory
from circus.common.heartbeat import QUEUE_RUNNER_KIND, HeartbeatThread
from circus.queue_runner.builds import gcroots
from circus.queue_runner.builds.postprocess import PostProcessor
from circus.queue_runner.derivations import DrvCache
from circus.queue_runner.dispatch.dispatcher import Dispatcher
from circus.queue_runner.local.worker import LocalBuilder
from circus.queue_runner.routing.capabilities import Capabilities, local_capabilities
from circus.queue_runner.routing.wakeups import Publish, WakeupPublisher, publish_after_commit
from circus.queue_runner.ssh.pool import SshBuilders
from circus.queue_runner.steps.outcomes import FinishReport
from circus.queue_runner.steps.reconciler import ReconcileReport, reconcile

log = logging.getLogger(__name__)

CLASS_POLL_SECS = 2.0


class ClassWatcher(threading.Thread):
    """Subscribes this process's Celery consumer to every class it can serve."""

    def __init__(self, daemon: QueueRunner) -> None:
        super().__init__(name="class-watcher", daemon=True)
        self.owner = daemon
        self.subscribed: set[str] = set()
        self.wakeup = threading.Event()
        self.ready = threading.Event()

    def initial(self) -> list[str]:
        caps = self.owner.capabilities
        names = set(caps.base_classes())
        try:
            names |= {n for n in self.known_classes() if caps.can_serve(n)}
        except Exception:
            log.warning("could not read the queue classes", exc_info=True)
        self.subscribed = set(names)
        return sorted(names)

    def known_classes(self) -> list[str]:
        from sqlalchemy import text

        with self.owner.factory() as session:
            return list(session.execute(text("SELECT name FROM queue_classes")).scalars())

    def notice(self, classes: list[str]) -> None:
        if any(c not in self.subscribed for c in classes):
            self.wakeup.set()

    def run(self) -> None:
        self.ready.wait()
        while not self.owner.stop.is_set():
            try:
                self.sync()
            except Exception:
                log.warning("could not update class subscriptions", exc_info=True)
            self.wakeup.wait(CLASS_POLL_SECS)
            self.wakeup.clear()

    def sync(self) -> None:
        caps = self.owner.capabilities
        for name in sorted(set(self.known_classes()) - self.subscribed):
            if not caps.can_serve(name):
                continue
            replies = self.owner.app.control.add_consumer(
                build_queue_name(name), destination=[self.owner.hostname], reply=True,
                timeout=2.0)
            if replies:
                self.subscribed.add(name)
                log.info("now consuming class %s", name)


class Consumer(Protocol):
    """Another consumer of the class queues that lives in this process (the agent gateway).

    The daemon receives it as a :class:`ConsumerFactory` instead of importing it,
    so the consumer may use the step services (``steps``, ``routing``) without an
    import cycle: it depends on the queue runner, never the other way round.
    """

    #: its key in the heartbeat's details
    name: str

    def start(self) -> None:
        """Start its threads; raise when it cannot serve."""

    def stop(self) -> None:
        """Stop, handing the steps it holds back to the queue."""

    def details(self) -> dict[str, Any]:
        """What the heartbeat reports about it."""


class ConsumerFactory(Protocol):
    def __call__(self, settings: Settings, session_factory: sessionmaker[Session], *,
                 publish: Publish | None,
                 on_built: Callable[[FinishReport], None] | None) -> Consumer: ...


class QueueRunner:
    def __init__(self, settings: Settings, *, dispatcher: bool = True,
                 workers: int | None = None, name: str | None = None,
                 ssh_builders: bool = True, consumers: Sequence[ConsumerFactory] = ()) -> None:
        self.settings = settings
        self.workers = settings.queue_runner.workers if workers is None else workers
        self.instance = name
        self.engine = make_engine(settings, application_name="circus-queue-runner",
                                  pool_size=self.workers + 4)
        self.factory = make_session_factory(self.engine)
        self.app = create_celery_app(settings, name="circus-queue-runner", engine=self.engine)
        self.stop = threading.Event()
        self.cache = DrvCache()
        self.capabilities = local_capabilities(settings)
        self.hostname = f"queue-runner-{name or os.getpid()}@{socket.gethostname()}"
        self.publisher = WakeupPublisher(self.app)
        # cache publishing waits while the local slots build (they need the cores)
        self.post = PostProcessor(settings, self.factory, busy=lambda: self.builder.busy())
        self.builder = LocalBuilder(settings, self.factory, self.capabilities,
                                    publish=self.publisher.publish, on_built=self.post.submit,
                                    stop=self.stop, cache=self.cache,
                                    name=f"local:{socket.gethostname()}:{name or os.getpid()}",
                                    slots=max(1, self.workers))
        self.app.circus_builder = self.builder
        self.watcher = ClassWatcher(self)
        self.gc_requested = threading.Event()
        self.dispatcher = Dispatcher(settings, self.factory, self.engine, self.cache, self.stop,
                                     publish=self.publisher.publish,
                                     on_classes=self.watcher.notice, on_built=self.post.submit,
                                     on_gc=self.gc_requested.set) if dispatcher else None
        self.reconciler = threading.Thread(target=self._reconcile_loop, name="reconciler",
                                           daemon=True)
        # SSH builders (remote_builders): another consumer of the class queues
        self.ssh = SshBuilders(settings, self.factory, publish=self.publisher.publish,
                               on_built=self.post.submit, stop=self.stop, cache=self.cache,
                               instance=f"{socket.gethostname()}:{name or os.getpid()}"
                               ) if ssh_builders else None
        # e.g. agents (the gateway): other consumers of the same class queues and leases
        self.consumers = [make(settings, self.factory, publish=self.publisher.publish,
                               on_built=self.post.submit) for make in consumers]
        self.started_consumers: list[Consumer] = []
        service = f"{QUEUE_RUNNER_KIND}-{name}@{socket.gethostname()}" if name else None
        self.heartbeat = HeartbeatThread(
            self.factory, QUEUE_RUNNER_KIND, details=self._details, service=service,
            interval=float(min(10, settings.queue_runner.poll_interval)))

    # ------------------------------------------------------------------ threads

    def _local_capabilities(self) -> list[Capabilities]:
        return [self.capabilities] if self.workers else []

    def _details(self) -> dict[str, Any]:
        return {
            "capabilities": [c.to_json() for c in self._local_capabilities()],
            "workers": self.workers,
            # the local builder leaves its own slots out when it counts the others
            "local_builder": self.builder.name,
            "dispatcher": self.dispatcher is not None,
            "running_batches": len(self.builder.active),
            "stats": {**{k: round(v, 3) for k, v in self.builder.stats.items()},
                      "post_batches": self.post.batches, "post_retried": self.post.retried},
            "celery_hostname": self.hostname,
            **({"ssh": self.ssh.details()} if self.ssh is not None else {}),
            **{consumer.name: consumer.details() for consumer in self.consumers},
        }

    def _reconcile_loop(self) -> None:
        runner = self.settings.queue_runner
        interval = float(min(runner.poll_interval, runner.lease_secs, runner.republish_secs))
        gc_every = float(self.settings.gc.cleanup_interval)
        next_gc = 0.0

        while not self.stop.is_set():
            try:
                report = in_transaction(self.factory, self._reconcile_once)
                if report.finish.builds.finished:
                    self.post.submit(report.finish)
            except Exception:
                log.exception("reconciling failed")
            try:
                # the builds' rollups: the deltas of the builds finished since the last pass
                in_transaction(self.factory, rollups.compact)
            except Exception:
                log.exception("merging the builds' rollups failed")
            now = time.monotonic()
            if self.settings.gc.enabled and (now >= next_gc or self.gc_requested.is_set()):
                self.gc_requested.clear()
                next_gc = now + gc_every
                try:
                    in_transaction(self.factory,
                                   lambda s: gcroots.sync_roots(s, self.settings))
                except Exception:
                    log.exception("syncing GC roots failed")
            self.stop.wait(interval if not self.gc_requested.is_set() else 0.1)

    def _reconcile_once(self, session: Session) -> ReconcileReport:
        report = reconcile(session, self.settings, self._local_capabilities())
        publish_after_commit(session, self.publisher.publish, report.to_publish)
        return report

    # ------------------------------------------------------------------ running

    def run(self) -> int:
        self.publisher.start()
        self.post.start()
        self.heartbeat.start()
        if self.dispatcher is not None:
            self.dispatcher.start()
        self.reconciler.start()
        if self.ssh is not None:
            self.ssh.start()
        for consumer in self.consumers:
            # listed first: shutdown() stops it even when its start failed half-way
            self.started_consumers.append(consumer)
            consumer.start()
        try:
            if self.workers > 0:
                return self._run_worker()
            self._wait_for_signal()
            return 0
        finally:
            self.shutdown()

    def _run_worker(self) -> int:
        queues = self.watcher.initial()
        signals.worker_shutting_down.connect(self._on_shutting_down, weak=False)
        signals.worker_ready.connect(lambda **_: self.watcher.ready.set(), weak=False)
        self.watcher.start()
        worker = self.app.Worker(
            hostname=self.hostname,
            queues=[build_queue_name(q) for q in queues],
            pool="threads",
            concurrency=self.workers,
            loglevel=self.settings.tracing.level.upper(),
            without_mingle=True,
            without_gossip=True,
        )
        worker.start()
        return int(worker.exitcode or 0)

    def _on_shutting_down(self, **_: Any) -> None:
        log.info("shutting down: running builds are handed back")
        self.stop.set()

    def _wait_for_signal(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self.stop.set())
        signal.signal(signal.SIGINT, lambda *_: self.stop.set())
        while not self.stop.wait(1.0):
            pass

    def shutdown(self) -> None:
        self.stop.set()
        for consumer in self.started_consumers:
            consumer.stop()
        if self.ssh is not None and self.ssh.is_alive():
            # stops every remote build and hands its step back
            self.ssh.join(30)
        if self.dispatcher is not None:
            self.dispatcher.join(10)
        self.reconciler.join(10)
        self.publisher.stop()
        self.post.stop()
        self.heartbeat.stop()
        self.engine.dispose()
