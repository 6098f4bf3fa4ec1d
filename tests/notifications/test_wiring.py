"""Celery wiring of notifications, and config checks on the declarative path."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session

import celeryconfig
from circus.common.celery import create_celery_app
from circus.common.config import ConfigError, Settings
from circus.declarative import apply_declarative


def test_tasks_are_registered_and_scheduled_on_the_notifications_queue(
        make_settings: Callable[..., Settings], engine: Engine) -> None:
    settings = make_settings(notifications={"collect_interval": 0.5, "cleanup_interval": 600})
    app = create_celery_app(settings, engine=engine)
    names = {f"circus.notifications.tasks.{n}"
             for n in ("deliver", "collect_events", "retry_due", "cleanup")}
    assert names <= set(app.tasks)
    routes = app.conf.task_routes
    assert routes["circus.notifications.*"]["queue"] == celeryconfig.NOTIFY_QUEUE
    beat = app.conf.beat_schedule
    scheduled = {entry["task"]: entry for entry in beat.values()}
    assert scheduled["circus.notifications.tasks.collect_events"]["schedule"] \
        .total_seconds() == 0.5
    assert scheduled["circus.notifications.tasks.retry_due"]["options"]["queue"] == \
        celeryconfig.NOTIFY_QUEUE
    assert scheduled["circus.notifications.tasks.cleanup"]["schedule"].total_seconds() == 600


def test_a_bad_declarative_notification_is_a_clear_error(
        db: Session, make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(declarative={"projects": [{
        "name": "x", "notifications": [{"type": "webhook", "config": {"url": "gopher://x"}}]}]})
    with pytest.raises(ConfigError,
                       match=r"declarative\.projects\[0\]\.notifications\[0\]\.config: "
                             r"url must be an http"):
        apply_declarative(db, settings)
