"""One step on an SSH builder: inputs there, build there, outputs back, finish.

1. the input closure (the ``.drv`` closure plus the outputs the derivation
   uses, all valid in the runner's store) goes to the builder, only what its
   store lacks;
2. ``nix-store --realise`` runs there (``remotebuild``); the log streams into
   the step's log file, so the API's live tail works as for local builds;
3. after a success the outputs' closure comes back, only what the runner's
   store lacks, and the outputs must then be valid here;
4. the step finishes through its ``steps.holder.StepHolder`` (the one write
   path of every consumer).

A ``LeaseKeeper`` thread renews the holder's lease meanwhile; when the step is
taken away (cancelled, lease lost) or the runner stops, the remote build is
stopped, and on shutdown the step is handed back without counting an attempt.
Builder problems (unreachable, host key, transfers, Nix itself failing) put
the builder into back-off; a step that did not start is handed back, one
that did ends ``aborted`` and is retried.
"""

from __future__ import annotations

import logging
import queue
import shlex
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy.orm import Session

from circus.common.db import in_transaction
from circus.common.enums import BuildStatus
from circus.common.nix import store
from circus.common.nix.derivation import read_derivation
from circus.common.nix.failures import Kind, failure_status
from circus.queue_runner.builds.products import OutputResult, read_output_result
from circus.queue_runner.builds.reproducibility import (
    builds_to_check,
    check_argv,
    judge_check,
    mark_non_deterministic,
)
from circus.queue_runner.derivations import DrvCache, DrvInfo
from circus.queue_runner.local.nixrun import (
    Exited,
    Finished,
    RunOptions,
    Started,
    Target,
)
from circus.queue_runner.ssh import health, transfer
from circus.queue_runner.ssh.builder import Builder
from circus.queue_runner.ssh.connection import Remote, RemoteError
from circus.queue_runner.ssh.remotebuild import RemoteNixRun
from circus.queue_runner.steps.holder import LeaseKeeper, StepHolder
from circus.queue_runner.steps.leases import ClaimedStep
from circus.queue_runner.steps.logs import StepLog, log_path_for
from circus.queue_runner.steps.outcomes import FinishReport, StepOutcome

log = logging.getLogger(__name__)

#: seconds beyond Nix's own timeouts before a silent channel counts as a dead link
DEAD_LINK_SLACK = 120.0
EVENT_POLL = 0.25


def _utc(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC)


class StepGone(Exception):
    """The step was taken away or the runner is stopping: stop work, report nothing."""


@dataclass
class _Verdict:
    outcome: StepOutcome
    result: OutputResult | None = None
    #: the builder misbehaved (counts towards its back-off)
    builder_failure: str | None = None


@dataclass
class _RunEvents:
    """What the remote run reported while :meth:`SshStep._follow` followed it."""

    #: when the log showed Nix starting the build (the runner's clock, epoch seconds)
    started: float | None = None
    #: Nix's verdict on the derivation, the first one it gave
    finished: Finished | None = None
    exited: Exited | None = None
    #: why the link was presumed dead and the run abandoned
    dead_link: str | None = None


class SshStep(threading.Thread):
    """One claimed step on one builder slot, held by ``holder``; ``on_done`` is
    called when the thread ends."""

    def __init__(self, holder: StepHolder, builder: Builder, slot: int, claimed: ClaimedStep,
                 remote: Remote, *, cache: DrvCache, nix_env: dict[str, str],
                 shutdown: threading.Event, on_done: Callable[[SshStep], None]) -> None:
        super().__init__(name=f"ssh-{builder.name}-{slot}", daemon=True)
        self.holder = holder
        self.settings = holder.settings
        self.builder = builder
        self.slot = slot
        self.claimed = claimed
        self.remote = remote
        self.cache = cache
        self.nix_env = nix_env
        self.shutdown = shutdown
        self.on_done = on_done
        self.keeper = LeaseKeeper(holder, lambda _: self.interrupt(),
                                  name=f"lease-{claimed.id}")
        self.run_: RemoteNixRun | None = None
        #: milliseconds per phase (debug log, benchmarks)
        self.phases: dict[str, float] = {}
        self._mark = time.monotonic()

    def phase(self, name: str) -> None:
        now = time.monotonic()
        self.phases[name] = round((now - self._mark) * 1000, 1)
        self._mark = now

    # ------------------------------------------------------------ control

    def gone(self) -> bool:
        return self.keeper.lost.is_set() or self.shutdown.is_set()

    def interrupt(self) -> None:
        run = self.run_
        if run is not None:
            run.kill()

    def run(self) -> None:
        try:
            self.keeper.start()
            self._run()
        except StepGone:
            self._after_gone()
        except Exception as exc:
            log.exception("step %s on %s failed unexpectedly", self.claimed.id, self.builder.name)
            self.interrupt()
            self._finish(_Verdict(self._abort(f"SSH worker error: {exc}")))
        finally:
            self.keeper.stop()
            self.on_done(self)

    # ------------------------------------------------------------ phases

    def _run(self) -> None:
        step = self.claimed
        try:
            info = self.cache.get(step.drv_path)
        except (OSError, ValueError) as exc:
            self._finish(_Verdict(StepOutcome(step.id, BuildStatus.aborted,
                                              error_message=f"cannot read derivation: {exc}",
                                              machine=self.builder.name)))
            return
        try:
            inputs = self._input_closure(info)
            self.phase("closure")
        except (store.StoreError, OSError, ValueError) as exc:
            self._finish(_Verdict(self._abort(f"cannot compute the input closure: {exc}")))
            return
        try:
            self.remote.connect()
            self.builder.learn_cpu_count(self.remote)
            missing = self._missing_inputs(inputs)
            self.phase("connect_check")
        except RemoteError as exc:
            # unreachable, or no working Nix there: nothing happened to the step, it
            # returns to the queue with no attempt counted
            self.builder.record_failure(str(exc))
            self._hand_back()
            return
        if len(missing) > transfer.CHUNK_PATHS:
            # too many for one stream into the build command: import them first
            try:
                transfer.send(self.remote, missing, self.nix_env, self.gone)
            except transfer.Cancelled:
                raise StepGone() from None
            except RemoteError as exc:
                if self.gone():
                    raise StepGone() from None
                self._finish(_Verdict(self._abort(f"could not copy the inputs to "
                                                  f"{self.builder.name}: {exc}"),
                                      builder_failure=str(exc)))
                return
            self.builder.learn_valid(missing)
            missing = []
        if self.gone():
            raise StepGone()
        verdict = self._build(info, missing)
        if verdict is not None:
            self._finish(verdict)
            if verdict.outcome.status is BuildStatus.succeeded:
                self._check_reproducibility(info)

    def _check_reproducibility(self, info: DrvInfo) -> None:
        """Rebuild the step with ``--check`` on this builder when its builds ask for it.

        The step is finished already (its dependents were released); the builder still
        has the inputs and outputs, and the rebuild holds this slot like a build would.
        """
        step_id = self.claimed.id
        wanted = in_transaction(self.holder.factory,
                                lambda s: builds_to_check(s, [step_id])).get(step_id)
        if not wanted or self.shutdown.is_set():
            return
        self.keeper.stop()  # nothing left to lease: the step is done
        options = self._options()
        argv = check_argv(info.drv_path, [
            "--timeout", str(options.timeout), "--max-silent-time", str(options.max_silent),
            "--option", "system-features", " ".join(options.system_features or [])])
        try:
            done = self.remote.run(" ".join(shlex.quote(a) for a in argv),
                                   timeout=options.timeout + 60)
            mismatch = judge_check(done.returncode, done.stderr.decode(errors="replace"),
                                   info.output_paths)
        except (RemoteError, RuntimeError) as exc:
            log.warning("reproducibility check of %s on %s not made: %s", info.drv_path,
                        self.builder.name, exc)
            return
        if mismatch is None:
            log.info("%s is reproducible on %s (builds %s)", info.drv_path, self.builder.name,
                     wanted)
            return
        changed = in_transaction(self.holder.factory, lambda s: mark_non_deterministic(
            s, wanted, f"{mismatch} (on {self.builder.name})"))
        log.info("%s: builds %s are non-deterministic", info.drv_path, changed)

    def _missing_inputs(self, inputs: list[str]) -> list[str]:
        """Inputs to send: those the builder lacks. Paths it is known to have are not
        asked about; a few small files are sent rather than asked about (importing a
        path it has is a no-op)."""
        unknown = self.builder.unknown_paths(inputs)
        if not unknown or transfer.small_files(unknown):
            return unknown
        missing = transfer.remote_invalid(self.remote, unknown)
        lacking = set(missing)
        self.builder.learn_valid([p for p in unknown if p not in lacking])
        return missing

    def _input_closure(self, info: DrvInfo) -> list[str]:
        """The ``.drv`` closure and the closure of the input outputs it uses (all valid
        here: the step is queued only once its dependencies succeeded), dependencies
        first."""
        drv = read_derivation(info.drv_path)
        roots = [info.drv_path]
        for input_drv, names in sorted(drv.input_drvs.items()):
            outputs = self.cache.get(input_drv).output_paths
            roots += [outputs[n] for n in names if n in outputs]
        return store.requisites(roots, self.nix_env)

    def _options(self) -> RunOptions:
        runner = self.settings.queue_runner
        caps = self.builder.capabilities
        return RunOptions(
            env={}, timeout=self.claimed.timeout or runner.build_timeout,
            max_silent=self.claimed.max_silent or runner.max_silent_time,
            max_log_size=runner.max_log_size, extra_args=list(runner.extra_nix_build_args),
            # the builder row is the admin's word on what the machine supports
            system_features=sorted(caps.supported_features | caps.mandatory_features))

    def _build(self, info: DrvInfo, send: list[str]) -> _Verdict | None:
        """Send ``send``, realise the step on the builder and bring the outputs back;
        None when it was handed back unbuilt.

        The run starts (:meth:`_start_run`), the inputs stream into it
        (:meth:`_send_inputs`), its events are followed until the remote command
        exits (:meth:`_follow`), the outcome is judged (:meth:`_judge`) and the
        step's log is finalised into it (:meth:`_close_log`).
        """
        options = self._options()
        run = self._start_run(info, options, send)
        if run is None:
            return None
        send_error = self._send_inputs(run, send)
        if self.gone():
            run.kill()
        events = self._follow(run, options)
        run.wait(30)
        self.phase("build")
        run.finish()
        step_log = run.logs[self.claimed.drv_path]
        if self.gone():
            step_log.close()
            raise StepGone()
        assert events.exited is not None
        try:
            verdict = self._judge(run, events.finished, events.exited,
                                  events.dead_link or send_error, send)
        except BaseException:
            step_log.close()
            raise
        self._close_log(step_log, verdict, events.started)
        return verdict

    def _start_run(self, info: DrvInfo, options: RunOptions, send: list[str]
                   ) -> RemoteNixRun | None:
        """Start ``nix-store --realise`` on the builder (importing ``send`` first when
        there is anything to send); None when it could not start (the step is
        handed back, the builder backs off)."""
        step = self.claimed
        target = Target(step.id, step.drv_path, info.output_paths,
                        log_path_for(self.settings.logs.log_dir, step.drv_path, step.id))
        run = RemoteNixRun(self.remote, [target], options, self.nix_env,
                           import_inputs=bool(send))
        try:
            run.start()
            self.phase("start")
        except RemoteError as exc:
            self.builder.record_failure(str(exc))
            self._hand_back()
            return None
        self.run_ = run
        return run

    def _send_inputs(self, run: RemoteNixRun, send: list[str]) -> str | None:
        """Stream ``send`` into the run's import; returns why that failed, if it did
        (the run is then abandoned, and :meth:`_judge` blames the builder)."""
        if not send:
            return None
        try:
            assert run.channel is not None
            transfer.stream_export(run.channel, send, self.nix_env, self.gone)
            run.touch()
            self.phase("send")
        except transfer.Cancelled:
            run.kill()
        except RemoteError as exc:
            run.abandon()
            return str(exc)
        return None

    def _follow(self, run: RemoteNixRun, options: RunOptions) -> _RunEvents:
        """Follow the run's events until the remote command exits, killing it when the
        step is gone and abandoning it when the link went silent for longer than Nix
        would let a build be."""
        events = _RunEvents()
        while events.exited is None:
            try:
                event = run.events.get(timeout=EVENT_POLL)
            except queue.Empty:
                event = None
            if isinstance(event, Started):
                events.started = event.at
            elif isinstance(event, Finished):
                events.finished = events.finished or event
            elif isinstance(event, Exited):
                events.exited = event
                break
            now = time.monotonic()
            if self.gone() and not run.killed:
                run.kill()
            elif not run.killed and now - run.last_data > options.max_silent + DEAD_LINK_SLACK:
                # Nix would have ended a silent build by now: the link is dead
                events.dead_link = f"no word from {self.builder.name} for " \
                                   f"{now - run.last_data:.0f} s: connection presumed dead"
                run.abandon()
        return events

    def _close_log(self, step_log: StepLog, verdict: _Verdict, started: float | None
                   ) -> None:
        """Note why an aborted step ended in its log, finalise the log into the outcome,
        and date the outcome's start from Nix's word when there is one."""
        outcome = verdict.outcome
        if outcome.status is BuildStatus.aborted and outcome.error_message:
            step_log.note(f"circus: {outcome.error_message}")
        outcome.log_path, outcome.log_size = step_log.finalize(self.settings.logs.compress)
        outcome.started_at = _utc(started) if started else outcome.started_at

    def _judge(self, run: RemoteNixRun, finished: Finished | None, exited: Exited,
               broken: str | None, sent: list[str]) -> _Verdict:
        step = self.claimed
        report = run.report
        name = self.builder.name
        if report.import_failed or (broken and sent and finished is None):
            detail = "\n".join(exited.errors[-10:]) or broken or "the import failed"
            error = f"could not copy the inputs to {name}: {detail}"
            return _Verdict(self._abort(error), builder_failure=error)
        if sent:
            self.builder.learn_valid(sent)
        if finished is not None and finished.kind is not Kind.built:
            if finished.kind is Kind.dependency_failed:
                # its inputs were copied there: Nix wanting to build one is the builder's fault
                problem = f"{name} could not use the inputs copied to it: {finished.message}"
                return _Verdict(self._abort(problem), builder_failure=problem)
            status, reason = failure_status(finished.kind, finished.signal, report.oom_kills)
            return _Verdict(StepOutcome(
                step.id, status, exit_code=finished.exit_code,
                error_message=reason or finished.message, finished_at=_utc(finished.at),
                machine=name))
        if finished is not None or report.exit_code == 0:
            return self._collect(run)
        if broken:
            error = broken
        elif exited.returncode < 0:
            error = f"the connection to {name} was lost during the build"
        else:
            error = "\n".join(exited.errors[-20:]) or \
                f"nix-store on {name} exited with status {exited.returncode}"
        return _Verdict(self._abort(error), builder_failure=error)

    def _collect(self, run: RemoteNixRun) -> _Verdict:
        """Bring the outputs home (normally already streamed back) and check them."""
        step = self.claimed
        outputs = self.cache.get(step.drv_path).output_paths
        report = run.report
        self.builder.learn_valid(list(outputs.values()))
        try:
            if report.import_error is None and set(outputs.values()) <= set(report.imported):
                missing: set[str] = set()
            else:
                # the stream did not make it (a reference the runner lacks, a lost
                # connection): ask for the closure, fetch what the runner lacks
                closure = transfer.remote_closure(self.remote, list(outputs.values()))
                lacking = set(store.invalid_paths(closure, self.nix_env))
                transfer.fetch(self.remote, [p for p in closure if p in lacking],
                               self.nix_env, self.gone)
                missing = set(store.invalid_paths(outputs.values(), self.nix_env))
        except transfer.Cancelled:
            raise StepGone() from None
        except RemoteError as exc:
            if self.gone():
                raise StepGone() from None
            error = f"could not copy the outputs from {self.builder.name}: {exc}"
            return _Verdict(self._abort(error), builder_failure=str(exc))
        except store.StoreError as exc:
            return _Verdict(self._abort(f"cannot check the outputs in the runner's store: {exc}"))
        if missing:
            problem = f"{sorted(missing)[0]} is not valid in the runner's store after the copy"
            return _Verdict(self._abort(problem), builder_failure=problem)
        result = read_output_result(outputs)
        status = BuildStatus.failed_with_output if result.failed_marker else BuildStatus.succeeded
        marker = "the builder created nix-support/failed" if result.failed_marker else None
        outcome = StepOutcome(step.id, status, error_message=marker, finished_at=_utc(time.time()),
                              machine=self.builder.name)
        self._check_size(outcome, outputs.values())
        return _Verdict(outcome, result)

    def _check_size(self, outcome: StepOutcome, outputs: Iterable[str]) -> None:
        limit = self.settings.queue_runner.max_output_size
        if not limit:
            return
        paths = list(outputs)
        try:
            sizes = store.path_infos(paths, self.nix_env)
        except store.StoreError:
            log.warning("could not measure output sizes", exc_info=True)
            return
        too_big = [p for p in paths if p in sizes and sizes[p].nar_size > limit]
        if too_big:
            outcome.status = BuildStatus.nar_size_limit_exceeded
            outcome.error_message = (f"output {too_big[0]} is larger than max_output_size "
                                     f"({limit} bytes)")

    # ------------------------------------------------------------ reporting

    def _abort(self, error: str) -> StepOutcome:
        return StepOutcome(self.claimed.id, BuildStatus.aborted, error_message=error,
                           finished_at=_utc(time.time()), machine=self.builder.name, retry=True)

    def _finish(self, verdict: _Verdict) -> None:
        if verdict.builder_failure:
            self.builder.record_failure(verdict.builder_failure)
        outcome = verdict.outcome
        results = {outcome.step_id: verdict.result} if verdict.result else {}
        # the builder did its part when Nix gave a verdict on the derivation
        healthy = outcome.status is not BuildStatus.aborted

        def record_health(session: Session, report: FinishReport) -> None:
            if healthy and self.builder.failing:
                health.record_success(session, self.builder.id)

        self.phase("collect")
        report = self.holder.finish([outcome], results, also=record_health)
        if report is None:
            return
        self.phase("finish")
        log.debug("step %s on %s: %s ms", self.claimed.id, self.builder.name, self.phases)
        if healthy:
            self.builder.record_ok()
        if report.finished:
            log.info("step %s (%s) on %s: %s", self.claimed.id, self.claimed.drv_path,
                     self.builder.name, outcome.status.name)

    def _hand_back(self) -> None:
        self.holder.release()

    def _after_gone(self) -> None:
        # taken away: nothing is held any more; the runner stopping: the step returns
        # to the queue, no attempt counted
        self.holder.release()
