"""Celery tasks of notifications: thin shells around :mod:`circus.notifications.service`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

from celery import shared_task

from circus.common import messaging
from circus.common.celery import DbTask
from circus.notifications import service

F = TypeVar("F", bound=Callable[..., Any])

#: collector transactions per run at most (each takes service.COLLECT_BATCH builds)
MAX_BATCHES = 10


def _task(name: str) -> Callable[[F], F]:
    return cast(Callable[[F], F],
                shared_task(base=DbTask, bind=True, name=name, ignore_result=True))


@_task(messaging.DELIVER_TASK)
def deliver(self: DbTask, task_id: int, attempt: int | None = None) -> str:
    return service.deliver(self.session, self.settings, task_id, attempt)


@_task(messaging.COLLECT_EVENTS_TASK)
def collect_events(self: DbTask) -> int:
    created = 0
    for _ in range(MAX_BATCHES):
        result = service.collect_events(self.session, self.settings)
        self.session.commit()
        created += len(result.task_ids)
        if result.builds < service.COLLECT_BATCH:
            break
    return created


@_task(messaging.RETRY_DUE_TASK)
def retry_due(self: DbTask) -> int:
    due = service.retry_due(self.session, self.settings)
    self.session.commit()
    return len(due)


@_task(messaging.CLEANUP_NOTIFICATIONS_TASK)
def cleanup(self: DbTask) -> int:
    deleted = service.cleanup(self.session, self.settings)
    self.session.commit()
    return deleted
