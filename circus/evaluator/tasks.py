"""Celery tasks of the evaluator: thin shells around the service functions."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar, cast

from celery import shared_task

import celeryconfig
from circus.common import messaging
from circus.common.celery import DbTask, enqueue
from circus.evaluator import execution, schedule, service

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


def _task(name: str) -> Callable[[F], F]:
    """``shared_task`` with the DbTask base (typed for mypy: Celery's hints are partial)."""
    return cast(Callable[[F], F],
                shared_task(base=DbTask, bind=True, name=name, ignore_result=True))


@_task(messaging.EVALUATOR_TICK_TASK)
def tick(self: DbTask) -> dict[str, Any]:
    session = self.session
    report = schedule.tick(session, self.settings)
    session.commit()
    return {"checks": len(report.checks), "reaped": report.reaped}


@_task(messaging.CHECK_TASK)
def check(self: DbTask, jobset_id: int) -> str:
    session = self.session
    outcome = service.check_jobset(session, self.settings, jobset_id)
    session.commit()
    return outcome


@_task(messaging.EVALUATE_TASK)
def evaluate(self: DbTask, evaluation_id: int) -> str:
    outcome = execution.execute(self.circus.session_factory, self.settings, evaluation_id,
                                task_id=self.request.id)
    if outcome.status not in ("deferred", "skipped", "busy"):
        # a slot is free: start the oldest evaluation waiting for one
        session = self.session
        for waiting in execution.next_pending(session)[:1]:
            enqueue(session, messaging.EVALUATE_TASK, waiting, queue=celeryconfig.EVAL_QUEUE)
        session.commit()
    return outcome.status
