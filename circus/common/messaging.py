"""Names one component uses to reach another: PostgreSQL NOTIFY channels, Celery
task names and HTTP header names. All are wire names (a sender and a receiver in
different daemons, perhaps of different versions during an upgrade, must agree), so
each is spelled here once.
"""

from __future__ import annotations

# -- NOTIFY channels (payloads are ids, or a word; the listener re-reads the database)

#: new or restarted builds to step: the evaluator's import (evaluation id) and build
#: restarts ("restart") wake the queue runner's dispatcher
BUILDS_CHANNEL = "circus_builds"
#: a build's outputs may be garbage now (build id): the dispatcher drops its GC roots
GC_CHANNEL = "circus_gc"

# -- Celery tasks (the routes in ``celeryconfig`` match these prefixes)

#: beat: stamp due jobsets, reap lost evaluations
EVALUATOR_TICK_TASK = "circus.evaluator.tasks.tick"
#: look for new inputs of a jobset (argument: jobset id)
CHECK_TASK = "circus.evaluator.tasks.check"
#: run an evaluation (argument: evaluation id)
EVALUATE_TASK = "circus.evaluator.tasks.evaluate"
#: a build queue has claimable steps (argument: the queue class)
WAKE_TASK = "circus.queue_runner.tasks.wake"
GC_CLEANUP_TASK = "circus.queue_runner.tasks.gc_cleanup"
#: beat: binary cache retention
RETENTION_TASK = "circus.cache.tasks.retention"
LDAP_SYNC_TASK = "circus.auth.tasks.sync_ldap"
#: deliver one notification attempt (arguments: task id, attempt)
DELIVER_TASK = "circus.notifications.tasks.deliver"
#: beat: build events -> notification tasks; due retries; old finished tasks
COLLECT_EVENTS_TASK = "circus.notifications.tasks.collect_events"
RETRY_DUE_TASK = "circus.notifications.tasks.retry_due"
CLEANUP_NOTIFICATIONS_TASK = "circus.notifications.tasks.cleanup"


# -- HTTP headers

#: names the calling remote worker (circus-worker) on /api/v1/workers, beside its token
WORKER_NAME_HEADER = "X-Circus-Worker"
