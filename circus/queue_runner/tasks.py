"""Celery tasks of the queue runner (thin: they take ids/names and call services)."""

from __future__ import annotations

import logging
from typing import Any

from celery import shared_task

from circus.common import messaging
from circus.common.celery import DbTask

log = logging.getLogger(__name__)


@shared_task(name=messaging.WAKE_TASK, bind=True, base=DbTask,  # type: ignore[untyped-decorator]
             ignore_result=True, acks_late=False)
def wake(self: DbTask, queue_class: str) -> int:
    """A wake-up token for a class queue: build what is queued there.

    Only a process running local build workers (``circus-queue-runner``) has a
    builder; anything else that consumed the message drops it (the reconciler
    re-publishes queued steps nobody claimed).
    """
    builder: Any = getattr(self.app, "circus_builder", None)
    if builder is None:
        log.warning("no local builder in this process; dropping the wake-up for %s",
                    queue_class)
        return 0
    return int(builder.serve(queue_class))


@shared_task(name=messaging.GC_CLEANUP_TASK, bind=True, base=DbTask,  # type: ignore[untyped-decorator]
             ignore_result=True)
def gc_cleanup(self: DbTask) -> dict[str, int]:
    """Remove GC roots nothing wants any more, add missing ones."""
    from circus.queue_runner.builds.gcroots import sync_roots

    with self.session.begin():
        report = sync_roots(self.session, self.settings)
    return {"added": report.added, "removed": report.removed}
