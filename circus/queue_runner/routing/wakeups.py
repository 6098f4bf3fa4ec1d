"""Wake-up messages on the class queues ``build.<queue class>``.

A message is a token, not a job: a consumer that receives one claims the best
queued steps of that class from the database (``leases.claim_steps``). So
duplicates are harmless (the claim finds nothing and the message is dropped),
and a lost message costs only latency (the reconciler re-publishes queued
steps that nobody claimed). Messages are sent after commit, from one
background thread, so a slow or unreachable broker never holds a database
transaction or a build worker.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from kombu import Connection, Queue
from sqlalchemy.orm import Session

from celeryconfig import BUILD_QUEUE_PREFIX, build_queue_name
from circus.common.db import after_commit
from circus.common.messaging import WAKE_TASK

log = logging.getLogger(__name__)

#: per class and flush: consumers drain their class in a loop, so a few tokens
#: wake every idle consumer without flooding the broker with one per step
MAX_TOKENS_PER_CLASS = 64

Publish = Callable[[Mapping[str, int]], None]


class WakeupPublisher:
    """Coalesces wake-ups per class and publishes them from a background thread."""

    def __init__(self, app: Any, max_tokens: int = MAX_TOKENS_PER_CLASS) -> None:
        self.app = app
        self.max_tokens = max_tokens
        self._queue: queue.Queue[Mapping[str, int] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="wakeup-publisher", daemon=True)
        self.published = 0

    def start(self) -> WakeupPublisher:
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    def publish(self, counts: Mapping[str, int]) -> None:
        if counts:
            self._queue.put(dict(counts))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            pending: Counter[str] = Counter(item)
            # coalesce whatever else is waiting into one round
            while True:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._send(pending)
                    return
                pending.update(more)
            self._send(pending)

    def _send(self, counts: Mapping[str, int]) -> None:
        try:
            send_wakeups(self.app, counts, self.max_tokens)
            self.published += sum(min(n, self.max_tokens) for n in counts.values())
        except Exception:
            # the reconciler re-publishes queued steps whose message went missing
            log.warning("could not publish wake-ups for %s", sorted(counts), exc_info=True)


def send_wakeups(app: Any, counts: Mapping[str, int],
                 max_tokens: int = MAX_TOKENS_PER_CLASS) -> None:
    with app.producer_or_acquire() as producer:
        for queue_class, count in counts.items():
            for _ in range(max(0, min(count, max_tokens))):
                app.send_task(WAKE_TASK, args=[queue_class], queue=build_queue_name(queue_class),
                              producer=producer, retry=False, ignore_result=True)


def publish_after_commit(session: Session, publish: Publish | None,
                         counts: Mapping[str, int]) -> None:
    if publish is None or not counts:
        return
    snapshot = dict(counts)
    after_commit(session, lambda: publish(snapshot))


class Wakeable(Protocol):
    """A consumer outside Celery's worker (agent bridge, SSH builders) fed by tokens."""

    #: every class steps were ever queued in (``queue_classes``), kept fresh by the consumer
    known_classes: list[str]

    def servable_classes(self, known: list[str]) -> list[str]:
        """The classes of ``known`` this consumer could take a step of right now."""
        ...

    def kick_threadsafe(self, queue_class: str) -> None:
        """Try to claim steps of ``queue_class`` (called from the consumer thread)."""
        ...


class WakeupConsumer(threading.Thread):
    """Consumes the class queues ``target`` can serve now; each token kicks it.

    The subscription follows ``target.servable_classes`` (re-checked every
    couple of seconds), so a consumer with no free slot takes no tokens away
    from the others.
    """

    def __init__(self, target: Wakeable, broker_url: str, name: str = "wakeups") -> None:
        super().__init__(name=name, daemon=True)
        self.target = target
        self.broker_url = broker_url
        self.stopped = threading.Event()
        self.classes: list[str] = []
        self.tokens = 0

    def wanted(self) -> list[str]:
        known = list(self.target.known_classes)
        return sorted(self.target.servable_classes(known))

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                self._consume()
            except Exception:
                log.warning("%s: lost the broker; retrying", self.name, exc_info=True)
                self.stopped.wait(1.0)

    def _consume(self) -> None:
        with Connection(self.broker_url, connect_timeout=5) as connection:
            while not self.stopped.is_set():
                classes = self.wanted()
                if not classes:
                    self.stopped.wait(0.5)
                    continue
                queues = [Queue(build_queue_name(c)) for c in classes]
                with connection.Consumer(queues, callbacks=[self._on_message],
                                         accept=["json"], prefetch_count=4):
                    self.classes = classes
                    deadline = time.monotonic() + 2.0
                    while time.monotonic() < deadline and not self.stopped.is_set():
                        try:
                            connection.drain_events(timeout=0.5)
                        except TimeoutError:
                            pass
                        if self.wanted() != classes:
                            break

    def _on_message(self, body: Any, message: Any) -> None:
        self.tokens += 1
        routing_key = str(message.delivery_info.get("routing_key") or "")
        queue_class = routing_key.removeprefix(BUILD_QUEUE_PREFIX)
        if not queue_class and isinstance(body, list) and body and body[0]:
            queue_class = str(body[0][0])
        message.ack()
        if queue_class:
            self.target.kick_threadsafe(queue_class)

    def stop(self) -> None:
        self.stopped.set()
