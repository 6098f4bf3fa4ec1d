"""The local build worker: claims steps of a class and realises them on this host.

A Celery wake-up message (``tasks.wake``) calls :meth:`LocalBuilder.serve` in a
pool thread. Through a ``steps.holder.StepHolder`` (the lease side every kind of
builder shares) it claims a batch, runs one ``nix-store --realise`` for it
(``nixrun``), reports each step as soon as Nix says it ended (batched per
~50 ms), renews the lease meanwhile, and claims again until the class is empty.
How the step was built is invisible to the layers below: SSH workers and the
agent gateway hold their steps through the same holder.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial

from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from circus.common.config import Settings
from circus.common.db import in_transaction
from circus.common.enums import BuildStatus
from circus.common.nix import store
from circus.common.nix.environment import current_system
from circus.common.nix.failures import Kind, failure_status
from circus.common.nix.oom import oom_counter
from circus.queue_runner.builds.products import OutputResult, read_output_result
from circus.queue_runner.builds.reproducibility import (
    builds_to_check,
    check_derivation,
    mark_non_deterministic,
)
from circus.queue_runner.derivations import DrvCache
from circus.queue_runner.local import procs
from circus.queue_runner.local.nixrun import (
    Exited,
    Finished,
    NixRun,
    RunOptions,
    Started,
    Target,
)
from circus.queue_runner.routing.capabilities import BUILTIN_SYSTEM, Capabilities
from circus.queue_runner.routing.wakeups import Publish
from circus.queue_runner.steps.holder import StepHolder
from circus.queue_runner.steps.leases import ClaimedStep, ClaimOptions, queued_chains
from circus.queue_runner.steps.logs import log_path_for
from circus.queue_runner.steps.outcomes import FinishReport, StepOutcome
from circus.queue_runner.steps.reconciler import live_consumer_slots

log = logging.getLogger(__name__)

#: the line before a build's log as Nix kept it (:meth:`_Batch._add_kept_log`)
KEPT_LOG_NOTE = ("[circus: the outputs were built by an earlier attempt that ended before "
                 "its log was whole; the build's log as Nix kept it follows]")

#: finished steps are reported together when they end within this window. A batch's
#: last step is reported at once (or when Nix exits), so the window delays only steps whose
#: dependents are mostly in the same batch (look-ahead); one transaction per step
#: was ~500 flushes (10-25 s of CPU on two cores) per 500-derivation DAG
FLUSH_DELAY = 0.25
#: how often the batch loop wakes without an event from Nix (flushes, renewals, stop)
EVENT_POLL = 0.05
#: a worker keeps claiming from its class this long before yielding its thread
DRAIN_BUDGET = 60.0
#: how long after a batch a slot still counts as busy (:meth:`LocalBuilder.busy`)
BUSY_GRACE = 2.0
#: how long a count of the other consumers of a class is reused: a slot claims several
#: times a second, heartbeats come every few seconds and an agent or SSH builder that
#: appears waits this long at most before claims leave it its share
OTHERS_TTL = 2.0


def _utc(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC)


@dataclass
class PendingOutcome:
    """A step outcome waiting to be reported, with what was read from its outputs."""

    outcome: StepOutcome
    result: OutputResult | None
    outputs: Mapping[str, str] = field(default_factory=dict)


class LocalBuilder:
    """Everything a local worker thread needs; one instance per daemon."""

    def __init__(self, settings: Settings, factory: sessionmaker[Session],
                 capabilities: Capabilities, *, publish: Publish | None = None,
                 on_built: Callable[[FinishReport], None] | None = None,
                 stop: threading.Event | None = None, cache: DrvCache | None = None,
                 name: str | None = None, slots: int | None = None) -> None:
        self.settings = settings
        self.factory = factory
        self.capabilities = capabilities
        self.publish = publish
        self.on_built = on_built
        self.stop = stop or threading.Event()
        self.cache = cache or DrvCache()
        self.hostname = socket.gethostname()
        self.name = name or f"local:{self.hostname}:{os.getpid()}"
        # workers = 0 runs no Celery worker; a builder made anyway still has one slot
        self.slots = slots or max(1, settings.queue_runner.workers)
        self.active: dict[str, NixRun] = {}
        self._lock = threading.Lock()
        #: when the last batch ended (monotonic): a slot between two batches is busy
        self._last_run_ended = float("-inf")
        #: seconds spent and counts per phase (heartbeat details, benchmarks)
        self.stats: dict[str, float] = {}
        #: queue class -> (monotonic time counted, slots of other consumers serving it)
        self._others: dict[str, tuple[float, int]] = {}

    def account(self, phase: str, started: float, count: int = 1) -> None:
        """Add the time since ``started`` (monotonic) and ``count`` to ``phase``'s stats."""
        with self._lock:
            key = f"{phase}_secs"
            self.stats[key] = self.stats.get(key, 0.0) + time.monotonic() - started
            self.stats[phase] = self.stats.get(phase, 0) + count

    @contextmanager
    def running(self, worker: str, run: NixRun) -> Iterator[NixRun]:
        """Show ``run`` in :attr:`active` (heartbeat details) while it runs."""
        with self._lock:
            self.active[worker] = run
        try:
            yield run
        finally:
            with self._lock:
                self.active.pop(worker, None)
                self._last_run_ended = time.monotonic()

    def busy(self) -> bool:
        """Whether a slot is building, or was a moment ago (a slot claiming its next
        batch is between two ``nix-store`` runs for a fraction of a second)."""
        with self._lock:
            return bool(self.active) or time.monotonic() - self._last_run_ended < BUSY_GRACE

    # ------------------------------------------------------------------ serving

    def worker_name(self) -> str:
        return f"{self.name}:{threading.current_thread().name}"

    def serve(self, queue_class: str) -> int:
        """Claim and build steps of ``queue_class`` until none is left; returns how many."""
        if not self.capabilities.can_serve(queue_class):
            log.warning("woken for %s, which this worker cannot build", queue_class)
            return 0
        holder = StepHolder(self.settings, self.factory, self.worker_name(),
                            publish=self.publish, on_built=self.on_built)
        built = 0
        deadline = time.monotonic() + DRAIN_BUDGET
        #: the next batch, claimed in the transaction that reported the last one's end
        claimed: list[ClaimedStep] = []
        while not self.stop.is_set() and time.monotonic() < deadline:
            if not claimed:
                started = time.monotonic()
                claimed = in_transaction(self.factory,
                                         lambda s: self.claim_batch(s, holder, queue_class))
                self.account("claims", started)
            if not claimed:
                break
            log.debug("%s claimed %s", holder.worker, [c.id for c in claimed])
            started = time.monotonic()
            claimed_next = self.build(holder, claimed, queue_class)
            self.account("batches", started)
            self.account("steps", started, len(claimed))
            built += len(claimed)
            # a fenced holder let go of everything, the next claim included
            claimed = [c for c in claimed_next if holder.holds(c.id)]
        if claimed:
            # stopping, or the drain budget is spent: the claim ahead goes back
            holder.release([c.id for c in claimed])
        return built

    def claim_batch(self, session: Session, holder: StepHolder, queue_class: str
                    ) -> list[ClaimedStep]:
        """Claim the next batch of ``queue_class`` for one slot (in the caller's transaction)."""
        runner = self.settings.queue_runner
        waiting = session.execute(text(
            "SELECT count(*) FROM steps WHERE state = 'queued' AND queue_class = :cls"),
            {"cls": queue_class}).scalar_one()
        if not waiting:
            return []
        # Share what is ready with the slots that could take it now, rounding down:
        # look-ahead fills a batch from each root and Nix builds a batch one derivation
        # at a time, so with three chain heads ready, two in one batch were built
        # serially while the other slot, holding the third, ran dry. A slot of ours that
        # is building takes nothing now: counting it left the last slot to claim with
        # half of what was left, and 19 fan-in steps queued at once went in 6 batches
        # instead of 2 (bench/build_overhead.py --e2e).
        others = self.other_slots(session, queue_class)
        with self._lock:
            building = sum(1 for worker in self.active if worker != holder.worker)
        size = runner.batch_size if others else runner.batch_size_alone
        free = max(1, self.slots - building)
        share = max(1, min(size, waiting // (free + others)))
        everyone = free + building + others
        if building and share > 1 and waiting < 2 * everyone \
                and queued_chains(session, queue_class, share):
            # The last few chain heads are the exception: look-ahead takes each head's
            # chain, and this batch would build them one after the other while the
            # building slot, done a moment later, found nothing left (the last links of
            # two or three chains in one batch idled the other slot for seconds in
            # bench/build_overhead.py --e2e). Only at the tail: with many heads ready,
            # dividing them among the building slots too made every batch follow fewer
            # chains deeper, and the chain claimed last (by id) started so late that it
            # alone was left at the end (1-2.4 s with the other slot idle, 4 of 5 rounds).
            # Independent steps (a fan-in's) are still taken whole.
            share = max(1, min(size, waiting // everyone))
        return holder.claim(session, queue_class, ClaimOptions(
            limit=share, machine=self.hostname, lookahead=True,
            critical_path=runner.critical_path_first, batch_limit=size))

    def other_slots(self, session: Session, queue_class: str) -> int:
        """Slots of live consumers besides this builder's that could take steps of
        ``queue_class`` (counted at most every ``OTHERS_TTL``).

        With none, a slot may claim up to ``batch_size_alone``: steps it holds would
        otherwise wait for this host's slots anyway. With some, its share of what is
        queued is divided among all their slots, up to ``batch_size``. A runner with
        ephemeral pools counts one more: an agent may be launched for the queue.
        """
        now = time.monotonic()
        with self._lock:
            cached = self._others.get(queue_class)
        if cached is not None and now - cached[0] < OTHERS_TTL:
            return cached[1]
        count = sum(c.slots for c in live_consumer_slots(session, settings=self.settings)
                    if c.local_builder != self.name and c.capabilities.can_serve(queue_class))
        if self.settings.queue_runner.ephemeral_pools:
            count += 1
        with self._lock:
            self._others[queue_class] = (now, count)
        return count

    # ------------------------------------------------------------------ building

    def build(self, holder: StepHolder, claimed: list[ClaimedStep],
              queue_class: str | None = None) -> list[ClaimedStep]:
        """Realise ``claimed`` (held by ``holder``) in one ``nix-store`` invocation.

        With ``queue_class``, the transaction reporting the batch's last outcome also
        claims the next batch of that class, returned (held by ``holder``) for the
        caller to build: the slot's next ``nix-store`` starts without a claim
        transaction of its own, and without waiting for this one to exit.
        """
        targets: list[Target] = []
        unreadable: list[StepOutcome] = []
        with holder.releasing():
            for step in claimed:
                try:
                    info = self.cache.get(step.drv_path)
                except (OSError, ValueError) as exc:
                    unreadable.append(StepOutcome(step.id, BuildStatus.aborted,
                                                  error_message=f"cannot read derivation: {exc}"))
                    continue
                targets.append(Target(step.id, step.drv_path, info.output_paths,
                                      log_path_for(self.settings.logs.log_dir, step.drv_path,
                                                   step.id), frozenset(info.input_drvs)))
                if step.attempts:
                    # a worker that held it before died: its builder may still be running
                    killed = procs.kill_builders_of(info.output_paths)
                    if killed:
                        log.info("killed %d leftover builder(s) of %s", killed, step.drv_path)
            if unreadable:
                self.report(holder, [PendingOutcome(o, None) for o in unreadable])
            if targets:
                return _Batch(self, holder, targets, claimed[0], queue_class).run()
        return []

    def run_options(self, timeout: int | None, max_silent: int | None) -> RunOptions:
        runner = self.settings.queue_runner
        caps = self.capabilities
        host = current_system()
        return RunOptions(
            env=self.settings.nix_environ(),
            timeout=timeout or runner.build_timeout,
            max_silent=max_silent or runner.max_silent_time,
            max_log_size=runner.max_log_size,
            extra_args=list(runner.extra_nix_build_args),
            system_features=sorted(caps.supported_features | caps.mandatory_features),
            extra_platforms=sorted(caps.systems - {host, BUILTIN_SYSTEM}),
            build_cgroup=runner.build_cgroup,
        )

    def report(self, holder: StepHolder, items: list[PendingOutcome],
               also: Callable[[Session, FinishReport], None] | None = None
               ) -> FinishReport | None:
        """Finish the steps of ``items`` through ``holder`` (``also`` in the same
        transaction); None when that failed."""
        runner = self.settings.queue_runner
        if runner.max_output_size:
            self._check_output_sizes(items)
        outcomes = [item.outcome for item in items]
        results = {item.outcome.step_id: item.result for item in items if item.result}
        started = time.monotonic()
        report = holder.finish(outcomes, results, also=also)
        self.account("flushes", started)
        return report

    def check_reproducibility(self, built: list[Target],
                              before: Callable[[], None] | None = None) -> None:
        """Rebuild with ``--check`` the succeeded steps whose builds ask for it
        (``before`` runs first when any does)."""
        wanted = in_transaction(self.factory, lambda s: builds_to_check(
            s, [t.step_id for t in built]))
        if before is not None and any(wanted.get(t.step_id) for t in built):
            before()
        for target in built:
            build_ids = wanted.get(target.step_id)
            if not build_ids or self.stop.is_set():
                continue
            started = time.monotonic()
            try:
                mismatch = check_derivation(target.drv_path, target.outputs,
                                            self.settings.nix_environ(),
                                            self.settings.queue_runner.build_timeout)
            except RuntimeError as exc:
                log.warning("reproducibility check of %s not made: %s", target.drv_path, exc)
                continue
            finally:
                self.account("repro_checks", started)
            if mismatch is None:
                log.info("%s is reproducible (builds %s)", target.drv_path, build_ids)
                continue
            changed = in_transaction(self.factory, partial(mark_non_deterministic,
                                                           build_ids=build_ids, message=mismatch))
            log.info("%s: builds %s are non-deterministic", target.drv_path, changed)

    def _check_output_sizes(self, items: list[PendingOutcome]) -> None:
        limit = self.settings.queue_runner.max_output_size
        built = [i for i in items if i.outcome.status in (BuildStatus.succeeded,
                                                          BuildStatus.failed_with_output)]
        if not built:
            return
        try:
            sizes = store.path_infos([p for i in built for p in i.outputs.values()],
                                     self.settings.nix_environ())
        except store.StoreError:
            log.warning("could not measure output sizes", exc_info=True)
            return
        for item in built:
            too_big = [p for p in item.outputs.values()
                       if p in sizes and sizes[p].nar_size > limit]
            if too_big:
                item.outcome.status = BuildStatus.nar_size_limit_exceeded
                item.outcome.error_message = (f"output {too_big[0]} is larger than "
                                              f"max_output_size ({limit} bytes)")


class _Batch:
    """One nix-store invocation and the bookkeeping around it.

    The lease side (renewal, finishing, handing back) is ``holder``'s; what is
    left here is how a batch is built and which outcome each step gets.
    """

    def __init__(self, builder: LocalBuilder, holder: StepHolder, targets: list[Target],
                 first: ClaimedStep, next_class: str | None = None) -> None:
        self.builder = builder
        self.holder = holder
        self.settings = builder.settings
        self.worker = holder.worker
        self.targets = {t.drv_path: t for t in targets}
        self.by_step = {t.step_id: t for t in targets}
        #: steps Nix has not settled yet (held, no outcome)
        self.held = set(self.by_step)
        #: the step whose failure each failed step of this batch comes down to (itself,
        #: or for a dependency failure the step it was propagated from)
        self.failure_origin: dict[int, int] = {}
        self.started: dict[str, float] = {}
        self.pending: list[PendingOutcome] = []
        self.first_pending = 0.0
        self.options = builder.run_options(first.timeout, first.max_silent)
        self.run_: NixRun | None = None
        #: steps that succeeded (candidates for a reproducibility check after the batch)
        self.built: list[Target] = []
        #: the class whose next batch the last report claims (None: the caller claims)
        self.next_class = next_class
        #: the next batch, claimed with the report of this one's last outcome
        self.next: list[ClaimedStep] = []

    def run(self) -> list[ClaimedStep]:
        """Build the batch; returns the next batch when one was claimed ahead."""
        started = time.monotonic()
        try:
            run = NixRun(list(self.targets.values()), self.options,
                         oom_counter(self.options.build_cgroup)).start()
        except OSError as exc:
            self._settle_all(f"could not start nix-store: {exc}", retry=True)
            return []
        self.run_ = run
        with self.builder.running(self.worker, run):
            try:
                outcome = self._follow(run, started)
            except BaseException:
                # a bug or an interrupt here must not leave Nix building steps nobody
                # reports: stop it and hand the steps back
                log.exception("batch of %d step(s) interrupted", len(self.targets))
                run.kill()
                self.pending.clear()
                self._release()
                raise
        if outcome is None:
            return []  # fenced: the lease could not be renewed
        stopping, exited = outcome
        if self.pending:
            self._flush()
        if stopping:
            self._release()
            return []
        started = time.monotonic()
        self._settle_after_exit(exited)
        self.builder.account("settles", started)
        if self.built:
            # dependents were released when these steps finished; the check comes after.
            # A check may outlast the lease of a batch claimed ahead (renewed only while
            # a batch runs): that batch goes back first
            self.builder.check_reproducibility(self.built, before=self._hand_back_next)
        return self.next

    def _hand_back_next(self) -> None:
        if self.next:
            self.holder.release([c.id for c in self.next])
            self.next = []

    def _follow(self, run: NixRun, started: float) -> tuple[bool, Exited | None] | None:
        """Follow Nix's events until it exits: (stopping, exit), or None when the
        lease was lost for good."""
        stopping = False
        while True:
            try:
                event = run.events.get(timeout=EVENT_POLL)
            except queue.Empty:
                event = None
            if isinstance(event, Started):
                self.started[event.drv_path] = event.at
            elif isinstance(event, Finished):
                self._finished(event)
            elif isinstance(event, Exited):
                self.builder.account("nix_runs", started)
                return stopping, event
            # the batch's last outcome goes at once: waiting for Nix to exit only
            # delays its dependents and the slot's next claim
            if self.pending and (not self.held
                                 or time.monotonic() - self.first_pending >= FLUSH_DELAY):
                self._flush(claim_next=not self.held and not stopping)
            if self.next and not self.held and not self.pending:
                # every step is reported and the next batch claimed: Nix has nothing
                # left to build, so the slot goes on while this nix-store exits (its
                # reader thread reaps it)
                self.builder.account("nix_runs", started)
                return stopping, None
            if self.holder.renew_due() and not self._renew(run):
                return None
            if self.builder.stop.is_set() and not stopping:
                stopping = True
                run.kill()

    # ---------------------------------------------------------------- outcomes

    def _finished(self, event: Finished) -> None:
        target = self.targets.get(event.drv_path)
        if target is None or target.step_id not in self.held:
            return
        self.held.discard(target.step_id)
        status, result, error = self._classify(event, target)
        propagated_from = None
        if status is BuildStatus.dependency_failed:
            propagated_from = self._failed_input(target)
        if not status.is_success:
            self.failure_origin[target.step_id] = propagated_from or target.step_id
        self._add(target, status, result, event.exit_code, error or event.message, event.at,
                  propagated_from)

    def _classify(self, event: Finished, target: Target
                  ) -> tuple[BuildStatus, OutputResult | None, str | None]:
        if event.kind is Kind.built:
            result = read_output_result(target.outputs)
            if result.failed_marker:
                return BuildStatus.failed_with_output, result, \
                    "the builder created nix-support/failed"
            return BuildStatus.succeeded, result, None
        status, error = failure_status(event.kind, event.signal, event.oom_kills)
        return status, None, error

    def _failed_input(self, target: Target) -> int | None:
        """The step a dependency failure of ``target`` comes from: the origin of a failed
        input built in this batch (a dependency-failed input's own origin, so a chain
        app -> lib -> leaf names leaf, as the holder's propagation does), else the first
        input this batch settled."""
        try:
            inputs = self.builder.cache.get(target.drv_path).input_drvs
        except (OSError, ValueError):
            return None
        settled = [dep for drv in inputs
                   if (dep := self.targets.get(drv)) is not None and dep.step_id not in self.held]
        for dep in settled:
            if dep.step_id in self.failure_origin:
                return self.failure_origin[dep.step_id]
        return settled[0].step_id if settled else None

    def _add(self, target: Target, status: BuildStatus, result: OutputResult | None,
             exit_code: int | None, error: str | None, at: float,
             propagated_from: int | None = None) -> None:
        assert self.run_ is not None
        log_path, log_size = self.run_.logs[target.drv_path].finalize(
            self.settings.logs.compress)
        started = self.started.get(target.drv_path)
        outcome = StepOutcome(
            target.step_id, status, exit_code=exit_code, error_message=error,
            log_path=log_path, log_size=log_size,
            started_at=_utc(started) if started else None, finished_at=_utc(at),
            machine=self.builder.hostname, propagated_from=propagated_from)
        if not self.pending:
            self.first_pending = time.monotonic()
        self.pending.append(PendingOutcome(outcome, result, target.outputs))

    def _flush(self, claim_next: bool = False) -> None:
        items, self.pending = self.pending, []
        claim = self._claim_next if claim_next and self.next_class is not None else None
        report = self.builder.report(self.holder, items, also=claim)
        if report is None:
            self.next = []  # rolled back with the report: nothing was claimed
            return
        finished = set(report.finished)
        # only what Nix built here (not substituted): a check rebuilds it locally
        self.built.extend(self.by_step[i.outcome.step_id] for i in items
                          if i.outcome.status is BuildStatus.succeeded
                          and i.outcome.step_id in finished
                          and self.by_step[i.outcome.step_id].drv_path in self.started)

    def _claim_next(self, session: Session, report: FinishReport) -> None:
        """The next batch, in the transaction reporting this one's last outcome (it
        sees the dependents that report queued). Assigned, not appended: a deadlock
        retry runs it again."""
        assert self.next_class is not None
        self.next = self.builder.claim_batch(session, self.holder, self.next_class)

    def _renew(self, run: NixRun) -> bool:
        renewal = self.holder.renew()
        if renewal.fenced:
            run.kill()
            run.wait(10)
            return False
        for step_id in sorted(renewal.lost & self.held):
            # cancelled, or taken over: stop that builder only, the batch goes on
            self.held.discard(step_id)
            target = self.by_step[step_id]
            run.kill_derivation(target.drv_path)
            run.logs[target.drv_path].close()
        if self.targets and not self.held and not self.pending:
            run.kill()
        return True

    def _release(self) -> None:
        """Hand back everything still held (shutdown, interruption)."""
        assert self.run_ is not None
        for step_id in sorted(self.held):
            self.run_.logs[self.by_step[step_id].drv_path].finalize(False)
        self.held.clear()
        self.holder.release()

    def _settle_after_exit(self, exited: Exited | None) -> None:
        unsettled = [self.by_step[i] for i in sorted(self.held)]
        if not unsettled:
            return
        error = "\n".join((exited.errors if exited else [])[-20:]) or \
            f"nix-store exited with status {exited.returncode if exited else '?'}"
        try:
            invalid = set(store.invalid_paths(
                [p for t in unsettled for p in t.outputs.values()], self.options.env))
        except store.StoreError as exc:
            invalid = {p for t in unsettled for p in t.outputs.values()}
            error = f"{error}\n{exc}"
        now = time.time()
        for target in unsettled:
            self.held.discard(target.step_id)
            if not any(p in invalid for p in target.outputs.values()):
                self._finished_valid(target, now)
            else:
                # Nix ended without saying what happened to it: an infrastructure problem
                self._add_abort(target, error, now)
        if self.pending:
            self._flush()

    def _finished_valid(self, target: Target, at: float) -> None:
        if target.drv_path not in self.started:
            self._add_kept_log(target)
        result = read_output_result(target.outputs)
        status = BuildStatus.failed_with_output if result.failed_marker else \
            BuildStatus.succeeded
        self._add(target, status, result, None, None, at)

    def _add_kept_log(self, target: Target) -> None:
        """Nix built nothing for ``target`` this time, yet its outputs are valid. When an
        earlier attempt built them here and died before its log had all of the build
        (``kill -9`` of the queue runner: its ``nix-store`` finishes what it registers,
        and the lines still in the pipe die with the reader), the log Nix kept of that
        build goes into the step's log: the step is never done without the log of the
        build that made its outputs."""
        assert self.run_ is not None
        try:
            kept = store.build_log(target.drv_path, self.options.env)
        except store.StoreError as exc:
            log.warning("could not read the log Nix kept of %s: %s", target.drv_path, exc)
            return
        if kept is not None and self.run_.logs[target.drv_path].add_kept(kept, KEPT_LOG_NOTE):
            log.info("%s: the log of its build came from Nix (no attempt had all of it)",
                     target.drv_path)

    def _add_abort(self, target: Target, error: str, at: float) -> None:
        self._add(target, BuildStatus.aborted, None, None, error, at)
        self.pending[-1].outcome.retry = True

    def _settle_all(self, error: str, retry: bool) -> None:
        now = time.time()
        for step_id in sorted(self.held):
            target = self.by_step[step_id]
            outcome = StepOutcome(step_id, BuildStatus.aborted, error_message=error,
                                  finished_at=_utc(now), machine=self.builder.hostname,
                                  retry=retry)
            self.pending.append(PendingOutcome(outcome, None, target.outputs))
        self.held.clear()
        self._flush()
