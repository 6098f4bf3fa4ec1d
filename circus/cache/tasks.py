"""Celery tasks of the binary cache (thin: they call the services)."""

from __future__ import annotations

from celery import shared_task

from circus.cache.retention import remove_unrooted
from circus.common import messaging
from circus.common.celery import DbTask


@shared_task(name=messaging.RETENTION_TASK, bind=True, base=DbTask)  # type: ignore[untyped-decorator]
def retention(self: DbTask) -> dict[str, int]:
    result = remove_unrooted(self.session, self.settings)
    self.session.commit()
    return result.as_dict()
