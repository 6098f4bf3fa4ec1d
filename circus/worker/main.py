"""``circus-worker``: a build-only Celery worker on another host.

It consumes the class queues ``build.<class>`` of its systems/features from the
network broker, like the queue runner's local workers, but has its own Nix
store and no database credentials: it claims, renews, logs, uploads outputs and
reports through the server's ``/api/v1/workers`` and substitutes its steps' inputs
from the server's ``/nix-cache``.
"""

from __future__ import annotations

import logging
import socket
import sys
import threading
import time
from typing import Any

from circus.common.configbase import host_program_arguments, settings_from_arguments
from circus.common.daemon_exit import exit_after_shutdown
from circus.common.logging import setup_logging

log = logging.getLogger("circus.worker")

#: the first heartbeat is retried this long before the worker gives up
STARTUP_PATIENCE_SECS = 120.0


class RemoteWorkerDaemon:
    def __init__(self, settings: Any) -> None:
        from celery import Celery

        from celeryconfig import build_queue_name, common_celery_settings
        from circus.common.kombu_redis import guard_closed_transport
        from circus.common.messaging import WAKE_TASK
        from circus.worker.builder import LeaseKeeper, RemoteBuilder
        from circus.worker.client import WorkerApi

        config = settings.worker
        self.settings = settings
        self.name = config.name or socket.gethostname()
        self.hostname = f"circus-worker-{self.name}@{socket.gethostname()}"
        self.queue_name = build_queue_name
        self.stop = threading.Event()
        self.api = WorkerApi(config, self.name)
        self.builder = RemoteBuilder(settings, self.api, self.stop)
        self.subscribed: set[str] = set()
        guard_closed_transport()
        self.app = Celery("circus-worker")
        # the daemons' common settings (broker options, serialisation, acks)
        self.app.conf.update(common_celery_settings(config.broker_url))
        builder = self.builder

        # the queue runner's wake-up task by its wire name; here it builds over the API
        @self.app.task(name=WAKE_TASK, ignore_result=True, acks_late=False)  # type: ignore[untyped-decorator]
        def wake(queue_class: str) -> int:
            return builder.serve(queue_class)

        self.wake = wake
        self.keeper_class = LeaseKeeper

    def first_heartbeat(self) -> dict[str, Any]:
        from circus.worker.builder import Failure

        deadline = time.monotonic() + STARTUP_PATIENCE_SECS
        keeper = self.keeper_class(self.builder, 60.0, lambda _: None)
        while True:
            try:
                return keeper.heartbeat()
            except Failure as exc:
                if time.monotonic() > deadline:
                    raise
                log.warning("the server does not answer yet (%s); retrying", exc)
                time.sleep(2.0)

    def follow(self, classes: list[str]) -> None:
        """Consume the queues of classes that appeared since the worker started."""
        for name in sorted(set(classes) - self.subscribed):
            if not self.builder.capabilities.can_serve(name):
                continue
            replies = self.app.control.add_consumer(
                self.queue_name(name), destination=[self.hostname], reply=True, timeout=2.0)
            if replies:
                self.subscribed.add(name)
                log.info("now consuming class %s", name)

    def run(self) -> int:
        from celery import signals

        from circus.worker.builder import UntrustedCache

        answer = self.first_heartbeat()
        try:
            self.builder.use_cache(answer.get("cache_public_key"))
        except UntrustedCache as exc:
            log.error("%s", exc)
            return 2
        classes = sorted(answer["classes"])
        self.subscribed = set(classes)
        keeper = self.keeper_class(self.builder, float(answer["lease_secs"]), self.follow)
        log.info("circus-worker %s: %d slot(s), classes %s, server %s", self.name,
                 self.settings.worker.slots, ", ".join(classes), self.settings.worker.server_url)

        def shutting_down(**_: Any) -> None:
            log.info("shutting down: running builds are handed back")
            self.stop.set()
            self.builder.stop_all()

        signals.worker_shutting_down.connect(shutting_down, weak=False)
        signals.worker_ready.connect(lambda **_: keeper.start(), weak=False)
        worker = self.app.Worker(
            hostname=self.hostname, queues=[self.queue_name(c) for c in classes],
            pool="threads", concurrency=self.settings.worker.slots,
            loglevel=self.settings.tracing.level.upper(), without_mingle=True,
            without_gossip=True)
        try:
            worker.start()
        finally:
            keeper.stop()
            try:
                # whatever is still held goes back; the server forgets the heartbeat
                self.api.leave()
            except Exception as exc:
                log.warning("could not say goodbye to the server (%s); held steps' leases "
                            "will lapse", exc)
        return int(worker.exitcode or 0)


def main(argv: list[str] | None = None) -> int:
    parser = host_program_arguments("circus-worker", __doc__, "worker")
    args = parser.parse_args(argv)
    from circus.worker.config import load_worker_settings

    settings = settings_from_arguments(args, load_worker_settings)
    setup_logging(settings.tracing)
    # run() returns once its shutdown is complete (an exception keeps the usual exit)
    return exit_after_shutdown(RemoteWorkerDaemon(settings).run())


if __name__ == "__main__":
    sys.exit(main())
