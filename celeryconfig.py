"""Celery configuration for every Circus daemon, derived from the Circus config.

Celery reads plain settings; :func:`celery_settings` builds them from a loaded
:class:`circus.common.config.Settings`, so brokers, queues and schedules are
never hard-coded per daemon. Messages carry ids only (JSON), and every task that
touches the database re-reads its rows.
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Any

from kombu import Queue

from circus.common import messaging

if TYPE_CHECKING:
    from circus.common.config import Settings

EVAL_QUEUE = "eval"
DISPATCH_QUEUE = "dispatch"
NOTIFY_QUEUE = "notifications"
MAINTENANCE_QUEUE = "maintenance"
#: build queues are ``build.<system>[.<feature>+<feature>...]``, one per class seen
BUILD_QUEUE_PREFIX = "build."

STATIC_QUEUES = (EVAL_QUEUE, DISPATCH_QUEUE, NOTIFY_QUEUE, MAINTENANCE_QUEUE)


def common_celery_settings(broker_url: str, result_backend: str | None = None
                           ) -> dict[str, Any]:
    """The settings every Celery app of Circus shares: the daemons' (:func:`celery_settings`)
    and ``circus-worker``'s on another host, which consumes the build queues only."""
    return {
        "broker_url": broker_url,
        # Circus keeps results in PostgreSQL; a result backend is optional
        "result_backend": result_backend,
        "task_ignore_result": result_backend is None,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "timezone": "UTC",
        "enable_utc": True,
        # one message at a time per worker process: long builds never hide short ones
        "worker_prefetch_multiplier": 1,
        # Tasks are idempotent and re-read state; losing a message is repaired by the
        # reconciler, so tasks ack early and never depend on visibility_timeout
        # redelivery (a build longer than the timeout would otherwise run twice).
        "task_acks_late": False,
        "task_reject_on_worker_lost": False,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        # a worker reconnecting after a network cut must be able to declare its
        # remote-control queue again while RabbitMQ still holds the dead connection's
        "control_queue_exclusive": False,
        # a Redis-only option (AMQP brokers redeliver on connection loss instead)
        "broker_transport_options": ({"visibility_timeout": 6 * 3600}
                                     if broker_url.startswith("redis") else {}),
        "task_create_missing_queues": True,
        "worker_hijack_root_logger": False,
    }


def celery_settings(settings: Settings) -> dict[str, Any]:
    """The Celery settings of the daemons' apps: the common ones, their queues, routes,
    events and beat schedule."""
    return {
        **common_celery_settings(settings.require_broker_url(), settings.broker.result_backend),
        "task_queues": [Queue(name) for name in STATIC_QUEUES],
        "task_default_queue": MAINTENANCE_QUEUE,
        "task_routes": {
            "circus.evaluator.*": {"queue": EVAL_QUEUE},
            "circus.queue_runner.dispatch.*": {"queue": DISPATCH_QUEUE},
            "circus.notifications.*": {"queue": NOTIFY_QUEUE},
        },
        # No task events by default: every wake-up and delivery would publish two
        # more broker messages (~0.3 s of the runner's CPU per 500 builds). Flower
        # turns them on in running workers itself (`celery control enable_events`);
        # broker.task_events sends them from the start (and "sent" events too).
        "worker_send_task_events": settings.broker.task_events,
        "task_send_sent_event": settings.broker.task_events,
        "beat_schedule": beat_schedule(settings),
    }


def beat_schedule(settings: Settings) -> dict[str, Any]:
    notify = settings.notifications
    ldap = settings.server.ldap
    directory = {
        # roles and API keys of LDAP users follow the directory between their logins
        "ldap-sync": {
            "task": messaging.LDAP_SYNC_TASK,
            "schedule": timedelta(seconds=ldap.sync_interval),
            "options": {"queue": MAINTENANCE_QUEUE, "expires": ldap.sync_interval},
        },
    } if ldap.enabled and ldap.sync_interval else {}
    return {
        **directory,
        "evaluator-tick": {
            "task": messaging.EVALUATOR_TICK_TASK,
            "schedule": timedelta(seconds=settings.evaluator.poll_interval),
            "options": {"queue": EVAL_QUEUE, "expires": settings.evaluator.poll_interval},
        },
        "cache-retention": {
            "task": messaging.RETENTION_TASK,
            "schedule": timedelta(seconds=settings.gc.cleanup_interval),
            "options": {"queue": MAINTENANCE_QUEUE, "expires": settings.gc.cleanup_interval},
        },
        # build events -> notification tasks, and due retries (both cheap when idle)
        "notifications-collect": {
            "task": messaging.COLLECT_EVENTS_TASK,
            "schedule": timedelta(seconds=notify.collect_interval),
            "options": {"queue": NOTIFY_QUEUE, "expires": notify.collect_interval},
        },
        "notifications-retry-due": {
            "task": messaging.RETRY_DUE_TASK,
            "schedule": timedelta(seconds=notify.collect_interval),
            "options": {"queue": NOTIFY_QUEUE, "expires": notify.collect_interval},
        },
        "notifications-cleanup": {
            "task": messaging.CLEANUP_NOTIFICATIONS_TASK,
            "schedule": timedelta(seconds=notify.cleanup_interval),
            "options": {"queue": NOTIFY_QUEUE, "expires": notify.cleanup_interval},
        },
    }


def build_queue_name(queue_class: str) -> str:
    return BUILD_QUEUE_PREFIX + queue_class
