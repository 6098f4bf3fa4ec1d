"""``circus-queue-runner``: dispatcher, reconciler and local build workers in one process.

Threads: the dispatcher (LISTEN/poll → steps → wake-ups), the reconciler
(leases, lost messages, unsupported classes, GC roots), the class watcher
(subscribes the local Celery consumer to new classes it can serve), the
wake-up publisher, the post-processor (closure sizes, GC roots), the SSH
builders (``ssh.pool``, a thread per remote build) and the heartbeat. The
main thread runs a Celery worker (thread pool, ``queue_runner.workers``
slots) consuming the class queues ``build.<class>``.

SIGTERM: Celery's warm shutdown starts; the stop event makes every running
batch kill its ``nix-store`` (SSH builds: their remote ``nix-store``) and hand
its unfinished steps back (they return to the queue without counting an
attempt), then the process exits.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import threading
import time
from typing import Any

from celery import signals
from sqlalchemy.orm import Session

from celeryconfig import build_queue_name
from circus.common.celery import create_celery_app
from circus.common.config import Settings
from circus.common.db import in_transaction, make_engine, make_session_factory
from circus.common.heartbeat import HeartbeatThread
from circus.gateway.autoscale import Autoscaler
from circus.gateway.bridge import Bridge
from circus.gateway.runtime import GatewayThread
from circus.gateway.server import Gateway
from circus.queue_runner import gcroots
from circus.queue_runner.capabilities import Capabilities, local_capabilities
from circus.queue_runner.derivations import DrvCache
from circus.queue_runner.dispatcher import Dispatcher
from circus.queue_runner.localworker import LocalBuilder
from circus.queue_runner.postprocess import PostProcessor
from circus.queue_runner.reconciler import QUEUE_RUNNER_KIND, ReconcileReport, reconcile
from circus.queue_runner.ssh.pool import SshBuilders
from circus.queue_runner.wakeups import WakeupConsumer, WakeupPublisher, publish_after_commit

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


class QueueRunner:
    def __init__(self, settings: Settings, *, dispatcher: bool = True,
                 workers: int | None = None, name: str | None = None,
                 ssh_builders: bool = True) -> None:
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
        self.post = PostProcessor(settings, self.factory)
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
        self.gateway: GatewayThread | None = None
        self.wakeups: WakeupConsumer | None = None
        self.autoscaler: Autoscaler | None = None
        if settings.queue_runner.rpc.bind:
            # agents: another consumer of the same class queues and leases
            self.gateway = GatewayThread(settings, self.factory, alongside=self._gateway_work)
            self.bridge = Bridge(self.gateway.gateway, settings, self.publisher.publish,
                                 self.post.submit)
            # GitHub Actions pools: launch agents when their queued work needs them
            self.autoscaler = (Autoscaler(self.gateway.gateway, settings)
                               if settings.queue_runner.ephemeral_pools else None)
            self.wakeups = WakeupConsumer(self.bridge, settings.require_broker_url(),
                                          name="agent-wakeups")
        service = f"{QUEUE_RUNNER_KIND}-{name}@{socket.gethostname()}" if name else None
        self.heartbeat = HeartbeatThread(
            self.factory, QUEUE_RUNNER_KIND, details=self._details, service=service,
            interval=float(min(10, settings.queue_runner.poll_interval)))

    async def _gateway_work(self, gateway: Gateway) -> None:
        """What runs on the gateway's loop next to the server: the bridge, autoscaling."""
        work = [self.bridge.run()]
        if self.autoscaler is not None:
            work.append(self.autoscaler.run())
        await asyncio.gather(*work)

    # ------------------------------------------------------------------ threads

    def _consumers(self) -> list[Capabilities]:
        return [self.capabilities] if self.workers else []

    def _details(self) -> dict[str, Any]:
        return {
            "capabilities": [c.to_json() for c in self._consumers()],
            "workers": self.workers,
            "dispatcher": self.dispatcher is not None,
            "running_batches": len(self.builder.active),
            "stats": {**{k: round(v, 3) for k, v in self.builder.stats.items()},
                      "post_batches": self.post.batches, "post_retried": self.post.retried},
            "celery_hostname": self.hostname,
            **({"ssh": self.ssh.details()} if self.ssh is not None else {}),
            **({"gateway": {"port": self.gateway.port if self.gateway.started.is_set() else None,
                            "agents": len(self.gateway.gateway.agents),
                            "assigned": self.bridge.assigned}} if self.gateway else {}),
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
        report = reconcile(session, self.settings, self._consumers())
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
        if self.gateway is not None:
            self.gateway.start()
            if not self.gateway.started.wait(30) or self.gateway.failed is not None:
                raise RuntimeError(f"the agent gateway did not start: {self.gateway.failed}")
            assert self.wakeups is not None
            self.wakeups.start()
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
        if self.wakeups is not None:
            self.wakeups.stop()
        if self.gateway is not None:
            # hands every agent's in-flight steps back to the queue
            self.gateway.stop()
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
