"""A lease holder's claimed steps, and every write about them (the consumer protocol).

Every consumer of the class queues (local workers, SSH builders, agents, and
whatever builds next) holds the steps it claimed under one ``worker`` name and
tells the database about them only through a :class:`StepHolder`:

- :meth:`StepHolder.claim`, inside the consumer's claim transaction, runs
  ``leases.claim_steps`` with the holder's worker name and lease; the steps
  count as held once that transaction commits;
- :meth:`StepHolder.renew` (``leases.renew_lease``), every
  :attr:`StepHolder.renew_every` seconds: steps missing from the answer were
  taken away (cancelled, or handed on after the lease lapsed) and their builds
  must stop. A holder that could not renew for 80 % of ``lease_secs`` fences
  itself: everything counts as lost, because another worker may take the
  steps any moment;
- :meth:`StepHolder.finish` goes through ``outcomes.finish_steps``, the one
  finishing path. Only steps still held are reported, and they stop being held
  whatever becomes of the transaction (when it fails, the lease lapses and the
  reconciler re-queues them), so nothing is finished twice. Wake-ups for newly
  queued dependents are published after commit; then ``on_finished`` and
  ``on_built`` hear of the report;
- :meth:`StepHolder.release` hands steps back without counting an attempt
  (``leases.release_steps``: shutdown, an interrupted batch, a builder that
  never took the step), wake-ups after commit; :meth:`StepHolder.releasing`
  does so for whatever is still held when an exception escapes the build.

So a consumer keeps only how it builds. The methods are thread-safe and
blocking (each runs its own transaction, deadlocks retried); the agent
gateway's asyncio loop calls them through ``asyncio.to_thread``.
:class:`LeaseKeeper` renews from a thread of its own for consumers that block
while they build (SSH).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from circus.common.config import Settings
from circus.common.db import after_commit, in_transaction
from circus.queue_runner.builds.products import OutputResult
from circus.queue_runner.routing.wakeups import Publish, publish_after_commit
from circus.queue_runner.steps.leases import (
    ClaimedStep,
    ClaimOptions,
    claim_steps,
    release_steps,
    renew_lease,
)
from circus.queue_runner.steps.outcomes import FinishReport, StepOutcome, finish_steps

log = logging.getLogger(__name__)

#: a holder that could not renew for this share of ``lease_secs`` stops building
FENCE_FRACTION = 0.8

OnReport = Callable[[FinishReport], None]


def default_renew_every(lease_secs: float) -> float:
    """Renewal period: often enough that a cancelled step stops within 2 s."""
    return max(0.5, min(2.0, lease_secs / 3))


@dataclass(frozen=True)
class Renewal:
    """What one renewal found."""

    #: steps no longer held: their builds must stop, their outcomes are not reported
    lost: frozenset[int] = frozenset()
    #: the lease could not be renewed in time: every held step is in ``lost``
    fenced: bool = False


class StepHolder:
    """The steps held under ``worker``'s lease; see the module docstring."""

    def __init__(self, settings: Settings, factory: sessionmaker[Session], worker: str, *,
                 publish: Publish | None = None, on_built: OnReport | None = None,
                 on_finished: OnReport | None = None, renew_every: float | None = None
                 ) -> None:
        self.settings = settings
        self.factory = factory
        self.worker = worker
        self.publish = publish
        #: hears of reports that finished builds (post-processing)
        self.on_built = on_built
        #: hears of every committed report (e.g. to claim newly queued dependents at once)
        self.on_finished = on_finished
        self.lease_secs = settings.queue_runner.lease_secs
        self.renew_every = renew_every or default_renew_every(self.lease_secs)
        self._held: set[int] = set()
        self._lock = threading.Lock()
        self._last_attempt = self._last_renewed = time.monotonic()

    # ------------------------------------------------------------ state

    @property
    def held(self) -> frozenset[int]:
        with self._lock:
            return frozenset(self._held)

    def holds(self, step_id: int) -> bool:
        with self._lock:
            return step_id in self._held

    def adopt(self, step_ids: Iterable[int]) -> None:
        """Hold steps the database says this worker holds (a stateless server
        rebuilds the holder of a remote worker per request from the leases)."""
        self._hold(step_ids)

    def _hold(self, step_ids: Iterable[int]) -> None:
        with self._lock:
            if not self._held:
                # the claim just set the lease
                self._last_attempt = self._last_renewed = time.monotonic()
            self._held.update(step_ids)

    def _let_go(self, step_ids: Iterable[int]) -> set[int]:
        """Stop holding ``step_ids``; returns those that were held."""
        with self._lock:
            gone = self._held.intersection(step_ids)
            self._held -= gone
            return gone

    # ------------------------------------------------------------ claim

    def claim(self, session: Session, queue_class: str, options: ClaimOptions
              ) -> list[ClaimedStep]:
        """``leases.claim_steps`` for this holder (in the caller's transaction), under
        its worker name and lease.

        The steps are held from the commit on (a rolled-back claim holds nothing).
        """
        claimed = claim_steps(session, self.worker, queue_class, options,
                              lease_secs=self.lease_secs)
        if claimed:
            ids = [step.id for step in claimed]
            after_commit(session, lambda: self._hold(ids))
        return claimed

    # ------------------------------------------------------------ lease

    def renew_due(self) -> bool:
        return time.monotonic() - self._last_attempt >= self.renew_every

    def renew(self) -> Renewal:
        """Extend the lease on every held step; see :class:`Renewal`."""
        ids = sorted(self.held)
        self._last_attempt = time.monotonic()
        if not ids:
            self._last_renewed = self._last_attempt
            return Renewal()
        try:
            kept = in_transaction(self.factory, lambda s: renew_lease(
                s, self.worker, ids, self.lease_secs))
        except Exception:
            log.warning("%s could not renew the lease on %d step(s)", self.worker, len(ids),
                        exc_info=True)
            if time.monotonic() - self._last_renewed <= self.lease_secs * FENCE_FRACTION:
                return Renewal()
            # fence ourselves: another worker may take these steps any moment
            log.error("%s: lease about to lapse without renewal; stopping %d step(s)",
                      self.worker, len(ids))
            return Renewal(frozenset(self._let_go(ids)), fenced=True)
        self._last_renewed = time.monotonic()
        lost = self._let_go(set(ids) - kept)
        for step_id in sorted(lost):
            log.info("step %d was taken away from %s (cancelled or lease lost)", step_id,
                     self.worker)
        return Renewal(frozenset(lost))

    # ------------------------------------------------------------ finish

    def finish(self, outcomes: Iterable[StepOutcome],
               results: Mapping[int, OutputResult] | None = None, *,
               also: Callable[[Session, FinishReport], None] | None = None
               ) -> FinishReport | None:
        """Report what became of held steps (``outcomes.finish_steps``).

        Outcomes of steps no longer held are dropped. ``also`` runs in the same
        transaction (consumer bookkeeping: builder health, agent statistics).
        Returns the committed report, or None when the transaction failed (the
        steps' leases then lapse and the reconciler re-queues them).
        """
        outcomes = list(outcomes)
        ours = self._let_go(o.step_id for o in outcomes)
        for outcome in outcomes:
            if outcome.step_id not in ours:
                log.info("step %d is no longer held by %s; its outcome (%s) is dropped",
                         outcome.step_id, self.worker, outcome.status.name)
        reported = [o for o in outcomes if o.step_id in ours]
        if not reported and also is None:
            return FinishReport()

        def work(session: Session) -> FinishReport:
            report = finish_steps(session, self.settings, self.worker, reported,
                                  results) if reported else FinishReport()
            publish_after_commit(session, self.publish, report.queued)
            if also is not None:
                also(session, report)
            return report

        try:
            report = in_transaction(self.factory, work)
        except Exception:
            log.exception("%s could not record %d finished step(s); their leases will lapse",
                          self.worker, len(reported))
            return None
        if self.on_finished is not None:
            self.on_finished(report)
        if self.on_built is not None and report.builds.finished:
            self.on_built(report)
        return report

    # ------------------------------------------------------------ release

    def release(self, step_ids: Collection[int] | None = None) -> list[int]:
        """Hand back held steps (all of them by default) without counting an attempt;
        returns the ids handed back."""
        with self._lock:
            ids = sorted(self._held if step_ids is None else self._held.intersection(step_ids))
            self._held.difference_update(ids)
        if not ids:
            return []

        def work(session: Session) -> None:
            queued = release_steps(session, self.worker, ids)
            publish_after_commit(session, self.publish, queued)

        try:
            in_transaction(self.factory, work)
        except Exception:
            log.exception("%s could not hand back %d step(s); their leases will lapse",
                          self.worker, len(ids))
        return ids

    @contextmanager
    def releasing(self) -> Iterator[StepHolder]:
        """Whatever is still held when an exception escapes goes back to the queue
        (a bug or an interrupt must not leave steps nobody builds or reports)."""
        try:
            yield self
        except BaseException:
            self.release()
            raise


class LeaseKeeper(threading.Thread):
    """Renews ``holder``'s lease from a thread of its own until nothing is held.

    ``on_lost`` is called (from this thread) when steps were taken away; the
    thread ends then, or when :meth:`stop` is called.
    """

    def __init__(self, holder: StepHolder, on_lost: Callable[[Renewal], None],
                 name: str | None = None) -> None:
        super().__init__(name=name or f"lease-{holder.worker}", daemon=True)
        self.holder = holder
        self.on_lost = on_lost
        self.lost = threading.Event()
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.holder.renew_every):
            renewal = self.holder.renew()
            if renewal.lost:
                self.lost.set()
                self.on_lost(renewal)
            if not self.holder.held:
                return

    def stop(self) -> None:
        self._done.set()
