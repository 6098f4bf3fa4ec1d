"""``circus-evaluator``: Celery beat (due-jobset ticks, retention) and the eval workers."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from celery.signals import beat_embedded_init

import celeryconfig
from circus.common.celery import create_celery_app
from circus.common.config import load_settings
from circus.common.configbase import exit_on_bad_config
from circus.common.daemon_exit import exit_after_shutdown
from circus.common.heartbeat import HeartbeatThread
from circus.common.localservices import die_with_parent
from circus.common.logging import setup_logging


def beat_dies_with_worker(worker_pid: int) -> Callable[..., None]:
    """A ``beat_embedded_init`` receiver: the embedded beat is a forked child of the
    worker, and without a parent-death signal it outlived a worker killed by SIGKILL,
    ticking on outside ``circus up``'s process tree beside the restarted worker's beat
    (found by ``tests/faults``)."""

    def receiver(sender: object = None, **kwargs: object) -> None:
        die_with_parent()()
        if os.getppid() != worker_pid:   # the worker died before the signal was set
            os._exit(0)

    return receiver


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="circus-evaluator", description=__doc__)
    parser.add_argument("--no-beat", action="store_true",
                        help="run workers only (when another evaluator runs beat)")
    args = parser.parse_args(argv)
    with exit_on_bad_config():
        settings = load_settings()
        settings.require_broker_url()
        settings.require_database_url()
    setup_logging(settings.tracing)
    app = create_celery_app(settings, name="circus-evaluator")
    work_dir = Path(settings.evaluator.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    # weak=False: the receiver is a closure nothing else holds on to
    beat_embedded_init.connect(beat_dies_with_worker(os.getpid()), weak=False)
    heartbeat = HeartbeatThread(app.circus.session_factory, "evaluator")
    heartbeat.start()
    worker = app.Worker(
        queues=[celeryconfig.EVAL_QUEUE, celeryconfig.MAINTENANCE_QUEUE,
                celeryconfig.NOTIFY_QUEUE],
        beat=not args.no_beat,
        schedule_filename=str(work_dir / "celerybeat-schedule"),
        # evaluations are subprocess-bound: threads share one engine and pool
        pool="threads",
        concurrency=settings.evaluator.max_concurrent_evals + 2,
        loglevel=settings.tracing.level.upper(),
        hostname="evaluator@%h",
        without_mingle=True,
        without_gossip=True,
    )
    try:
        worker.start()
    finally:
        heartbeat.stop()
    # the worker's warm shutdown is complete (an exception keeps the usual exit)
    return exit_after_shutdown(int(worker.exitcode or 0))


if __name__ == "__main__":
    sys.exit(main())
