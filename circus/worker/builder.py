"""The remote worker's builder: what a wake-up on ``build.<class>`` does on this host.

``serve(queue_class)`` (called by the Celery task in a pool thread, like
``LocalBuilder.serve`` in the queue runner) claims a batch of steps at a time
through the server's API (``[worker] batch_size`` at most, and no more than the
worker's fair share of the queue, which the server decides) and builds it with
this host's Nix, in this slot, so each step's fixed costs (Nix processes, HTTP
calls, the server's verification, import and signing) are paid once per batch:

1. the input closure paths this store lacks are substituted from the server's
   binary cache ``/nix-cache`` in one ``nix copy`` (the claim published them there,
   signed; the worker trusts the key the server's heartbeat answer names and sends its
   name and token as netrc credentials, which open hidden projects' paths of its held
   steps only);
2. ``nix-store --realise`` runs for each step in turn, its output streamed to the
   step's log on the server;
3. the outputs go back as one export stream, which the server checks (every path
   an output of a step of the batch it holds) before importing, signing and
   publishing;
4. the outcomes are reported in one call; the server finishes the steps through its
   StepHolder in one transaction.

A :class:`LeaseKeeper` thread renews the leases of running steps and stops a
build whose step was taken away (cancelled, or its lease lapsed while the
server was unreachable).
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests

from circus.common.nix.environment import current_system, nix_environ, sandbox_options
from circus.common.nix.realise import Outcome, RealiseResult, realise
from circus.common.nix.store import StoreError, dependency_order
from circus.common.nix.store.aio import invalid_paths, path_infos
from circus.common.nix.transfer import export_to_file, substitute_from
from circus.queue_runner.routing.capabilities import Capabilities
from circus.worker.client import ApiError, WorkerApi
from circus.worker.config import WorkerSettings

log = logging.getLogger(__name__)

#: the server takes a log chunk of at most 1 MiB per call
LOG_CHUNK = 256 * 1024
#: tries to substitute a step's inputs before the step goes back as an import failure
FETCH_ATTEMPTS = 3
Failure = (ApiError, requests.RequestException)


class UntrustedCache(Exception):
    """The server names no key for its cache, or not the pinned one: the worker cannot
    trust its inputs."""


@dataclass
class RunningStep:
    step_id: int
    loop: asyncio.AbstractEventLoop
    cancel: asyncio.Event
    #: the server took it away: its outcome is not reported
    lost: bool = False
    #: its outcome is being reported (the server lets go of it meanwhile: a renewal
    #: answering "lost" then is no news)
    reporting: bool = False

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.cancel.set)


class RemoteBuilder:
    """One per ``circus-worker`` process; ``serve`` runs in Celery's pool threads."""

    def __init__(self, settings: WorkerSettings, api: WorkerApi,
                 stop: threading.Event | None = None) -> None:
        config = settings.worker
        self.config = config
        self.api = api
        self.stop = stop or threading.Event()
        self.capabilities = Capabilities(frozenset(config.systems or [current_system()]),
                                         frozenset(config.features),
                                         frozenset(config.mandatory_features))
        nix = settings.nix
        self.nix_config = nix.config
        self.nix_env = nix_environ(nix.substituters, nix.trusted_public_keys, extra={
            **sandbox_options(nix.sandbox, nix.sandbox_paths), **nix.config})
        features = sorted(set(config.features) | set(config.mandatory_features))
        self.nix_args = ["--option", "system-features", " ".join(features)] if features else []
        self.work_dir = Path(config.work_dir)
        self.cache_url = config.server_url.rstrip("/") + "/nix-cache"
        #: Nix's environment for substituting from the server's cache (use_cache)
        self.fetch_env: dict[str, str] | None = None
        self.running: dict[int, RunningStep] = {}
        self._lock = threading.Lock()
        self.built = 0

    def use_cache(self, public_key: str | None) -> None:
        """Substitute inputs from the server's cache, trusting ``public_key`` (from the
        heartbeat answer) for them; the worker's name and token go in a netrc file only
        this user reads."""
        if not public_key:
            raise UntrustedCache("the server's /nix-cache is not signed (signing.enabled): a "
                                 "worker cannot trust its inputs")
        pinned = self.config.cache_public_key
        if pinned and public_key != pinned:
            raise UntrustedCache(f"the server announces the cache key {public_key!r}, not the "
                                 f"pinned worker.cache_public_key {pinned!r}: refusing to take "
                                 "inputs signed by it")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        netrc = self.work_dir / "netrc"
        host = urlsplit(self.cache_url).hostname or ""
        fd = os.open(netrc, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(f"machine {host} login {self.api.name} password {self.config.token}\n")
        extra = {**self.nix_config, "netrc-file": str(netrc),
                 # a path published a moment ago must not stay "missing" in Nix's cache
                 "narinfo-cache-negative-ttl": "0"}
        if self.config.ca_file:
            extra["ssl-cert-file"] = self.config.ca_file
        self.fetch_env = nix_environ([], [public_key], extra=extra)

    # ------------------------------------------------------------ serving

    def serve(self, queue_class: str) -> int:
        """Claim and build batches of ``queue_class`` until none is left; returns how
        many steps were built."""
        if not self.capabilities.can_serve(queue_class):
            log.warning("woken for %s, which this worker cannot build", queue_class)
            return 0
        built = 0
        while not self.stop.is_set():
            try:
                # the server gives no more than this worker's fair share of the queue
                steps = self.api.claim(queue_class, self.config.batch_size)
            except Failure as exc:
                # the wake-up is lost; the reconciler publishes another one
                log.warning("could not claim from %s: %s", queue_class, exc)
                break
            if not steps:
                break
            self.build_batch(steps)
            built += len(steps)
        return built

    def build(self, step: dict[str, Any]) -> None:
        """:meth:`build_batch` of one step."""
        self.build_batch([step])

    def build_batch(self, steps: list[dict[str, Any]]) -> None:
        """Build claimed steps one after another in this slot (one fetch of their inputs,
        one upload of their outputs, one report); a step whose build is over waits for
        the batch's report, its lease renewed meanwhile."""
        ids = [int(step["id"]) for step in steps]
        try:
            asyncio.run(self._build_batch(steps))
        except BaseException:
            log.exception("steps %s: the batch failed unexpectedly; handing them back", ids)
            with self._lock:
                unreported = [i for i in ids if i in self.running
                              and not self.running[i].reporting]
            try:
                if unreported:
                    self.api.release(unreported)
            except Failure:
                log.warning("steps %s could not be handed back; their leases will lapse",
                            unreported)
            raise
        finally:
            with self._lock:
                for step_id in ids:
                    self.running.pop(step_id, None)
            self.built += len(ids)

    def held(self) -> list[int]:
        with self._lock:
            return sorted(self.running)

    def take_away(self, step_ids: set[int]) -> int:
        """The server says these are no longer ours (or may soon not be): stop their
        builds; returns how many were still going."""
        with self._lock:
            found = [self.running[i] for i in step_ids if i in self.running]
        stopped = 0
        for running in found:
            if running.reporting or running.lost:
                continue
            log.info("step %d was taken away; stopping its build", running.step_id)
            running.lost = True
            running.stop()
            stopped += 1
        return stopped

    def stop_all(self) -> None:
        with self._lock:
            found = list(self.running.values())
        for running in found:
            running.stop()

    # ------------------------------------------------------------ one batch

    async def _build_batch(self, steps: list[dict[str, Any]]) -> None:
        loop = asyncio.get_running_loop()
        runnings = {int(step["id"]): RunningStep(int(step["id"]), loop, asyncio.Event())
                    for step in steps}
        with self._lock:
            self.running.update(runnings)
        if self.stop.is_set():
            # shutdown began between the claim and here (stop_all did not see these)
            log.info("steps %s: shutting down; handing them back unbuilt", sorted(runnings))
            await asyncio.to_thread(self.api.release, sorted(runnings))
            return
        reports: dict[int, dict[str, Any]] = {}
        # 1. the inputs this store lacks, for the whole batch
        closure = list(dict.fromkeys(
            path for step in steps for path in [*step["input_closure"], step["drv_path"]]))
        try:
            await self._fetch_inputs(sorted(runnings), closure)
        except (StoreError, OSError, *Failure) as exc:
            now = time.time()
            for step_id in runnings:
                reports[step_id] = {"outcome": "import_failure", "started_at": now,
                                    "error_message": f"could not fetch inputs: {exc}"}
            await self._report(runnings, reports)
            return
        # 2. the builds, one after another, each log streamed to the server
        built: dict[int, list[str]] = {}
        senders: dict[int, asyncio.Task[None]] = {}
        for step in steps:
            step_id = int(step["id"])
            running = runnings[step_id]
            if running.lost:
                continue
            if self.stop.is_set():
                reports[step_id] = {"outcome": "aborted", "started_at": time.time(),
                                    "error_message": "the worker is shutting down"}
                continue
            log.info("step %d: building %s", step_id, step["drv_path"])
            reports[step_id] = await self._realise(step, running, senders)
            if reports[step_id]["outcome"] in (Outcome.success.value,
                                                Outcome.failed_with_output.value):
                built[step_id] = list(dict(step["outputs"]).values())
        # every log is on the server before the outcomes (which finalise the logs); a
        # step taken away meanwhile is not reported, so its log sender (which may hang
        # in a request sent into a cut link until the client's timeout) is not waited for
        await asyncio.gather(*(sender for step_id, sender in senders.items()
                               if not runnings[step_id].lost))
        # 3. outputs travel to the server, which checks them before importing
        uploading = {i: outputs for i, outputs in built.items() if not runnings[i].lost}
        for step_id, error in (await self._upload_outputs(uploading)).items():
            reports[step_id].update(outcome="upload_failure",
                                    error_message=f"could not send the outputs: {error}")
        await self._report(runnings, reports)

    async def _realise(self, step: dict[str, Any], running: RunningStep,
                       senders: dict[int, asyncio.Task[None]]) -> dict[str, Any]:
        """Build one step; its log goes to the server from a task of its own (kept
        to ``senders`` by step id, awaited before the batch reports), so neither this build's
        output nor the next build waits for an HTTP round trip."""
        step_id = running.step_id
        log_bytes = 0
        chunks: asyncio.Queue[bytes | None] = asyncio.Queue()

        async def send_logs() -> None:
            while (chunk := await chunks.get()) is not None:
                if running.lost:
                    # no longer ours: the server refuses it, and a cut link would hang it
                    continue
                for start in range(0, len(chunk), LOG_CHUNK):
                    try:
                        await asyncio.to_thread(self.api.log, step_id,
                                                chunk[start:start + LOG_CHUNK])
                    except ApiError as exc:
                        if exc.status in (403, 409):
                            running.lost = True
                            running.stop()
                        break
                    except requests.RequestException as exc:
                        # the log is best effort; the outcome is what counts
                        log.warning("step %d: a log chunk was lost: %s", step_id, exc)
                        break

        async def send_log(chunk: bytes) -> None:
            nonlocal log_bytes
            log_bytes += len(chunk)
            chunks.put_nowait(chunk)

        senders[step_id] = asyncio.ensure_future(send_logs())
        outputs: dict[str, str] = dict(step["outputs"])
        result: RealiseResult = await realise(
            str(step["drv_path"]), env=self.nix_env, timeout=int(step["timeout"]) or None,
            max_silent=int(step["max_silent"]) or None,
            max_log_size=int(step["max_log_size"]), on_log=send_log,
            extra_args=self.nix_args, cores=self.config.cores, cancel=running.cancel,
            output_paths=list(outputs.values()))
        chunks.put_nowait(None)
        return {
            "outcome": result.outcome.value, "exit_code": result.returncode,
            "started_at": result.started_at, "finished_at": result.finished_at,
            "error_message": (result.error_message or "")[:4000] or None,
            "log_bytes": log_bytes}

    async def _report(self, runnings: dict[int, RunningStep],
                      reports: dict[int, dict[str, Any]]) -> None:
        """Report the batch's outcomes in one call; a step taken away is not reported,
        and while shutting down an unfinished one goes back without counting an attempt."""
        finished: list[dict[str, Any]] = []
        handed_back: list[int] = []
        for step_id, report in reports.items():
            running = runnings[step_id]
            running.reporting = True
            report.setdefault("finished_at", time.time())
            if running.lost:
                log.info("step %d: stopped (%s); no longer this worker's", step_id,
                         report["outcome"])
            elif self.stop.is_set() and report["outcome"] in ("cancelled", "aborted"):
                handed_back.append(step_id)
            else:
                finished.append({"step_id": step_id, **report})
        if handed_back:
            try:
                await asyncio.to_thread(self.api.release, handed_back)
                for step_id in handed_back:
                    log.info("step %d: handed back", step_id)
            except Failure as exc:
                log.warning("steps %s could not be handed back (%s); their leases will "
                            "lapse", handed_back, exc)
        if not finished:
            return
        try:
            statuses = await asyncio.to_thread(self.api.finish_many, finished)
        except ApiError as exc:
            # one step of the batch no longer ours (cancelled meanwhile) refuses the
            # whole call: report the others one by one
            log.info("the batch report was refused (%s); reporting step by step", exc)
            statuses = {}
            for report in finished:
                values = {k: v for k, v in report.items() if k != "step_id"}
                try:
                    statuses[report["step_id"]] = await asyncio.to_thread(
                        self.api.finish, report["step_id"], **values)
                except ApiError as refused:
                    log.warning("step %d: the server refused the outcome: %s",
                                report["step_id"], refused)
        for step_id, status in sorted(statuses.items()):
            log.info("step %d: %s", step_id, status)

    async def _fetch_inputs(self, step_ids: list[int], wanted: list[str]) -> None:
        missing = await invalid_paths(wanted, self.nix_env)
        if not missing:
            return
        if self.fetch_env is None:
            raise StoreError("the server's cache key is not known yet")
        for attempt in range(1, FETCH_ATTEMPTS + 1):
            try:
                # Nix's narinfo cache of its own: concurrent `nix copy`s sharing one
                # (~/.cache/nix/binary-cache-v6.sqlite) failed with "constraint failed"
                with tempfile.TemporaryDirectory(dir=self.work_dir, prefix="fetch-") as home:
                    await substitute_from(self.cache_url, missing,
                                          {**self.fetch_env, "XDG_CACHE_HOME": home})
                break
            except StoreError as exc:
                # a server process may learn of the paths the claim published a moment
                # after the claim was answered (NOTIFY)
                if attempt == FETCH_ATTEMPTS:
                    raise
                log.info("steps %s: fetching inputs failed (%s); retrying", step_ids, exc)
                await asyncio.sleep(attempt)
        unarrived = await invalid_paths(missing, self.nix_env)
        if unarrived:
            raise StoreError(f"{unarrived[0]} is not in the store after the fetch")
        log.debug("steps %s: substituted %d input path(s)", step_ids, len(missing))

    async def _upload_outputs(self, outputs_of: dict[int, list[str]]) -> dict[int, str]:
        """Send the steps' outputs as one export stream; returns why for the steps whose
        outputs did not arrive. A refused batch (a step of it no longer ours) is sent
        again step by step."""
        if not outputs_of:
            return {}
        try:
            await self._send_outputs(sorted(outputs_of),
                                     [p for paths in outputs_of.values() for p in paths])
            return {}
        except ApiError as exc:
            if len(outputs_of) == 1 or exc.status not in (403, 409):
                return dict.fromkeys(outputs_of, str(exc))
            log.info("the batch upload was refused (%s); sending step by step", exc)
        except (StoreError, OSError, *Failure) as exc:
            return dict.fromkeys(outputs_of, str(exc))
        errors: dict[int, str] = {}
        for step_id, paths in sorted(outputs_of.items()):
            try:
                await self._send_outputs([step_id], paths)
            except (StoreError, OSError, *Failure) as exc:
                errors[step_id] = str(exc)
        return errors

    async def _send_outputs(self, step_ids: list[int], outputs: list[str]) -> None:
        infos = await path_infos(outputs, self.nix_env)
        wanted = set(outputs)
        order = [p for p in dependency_order(infos) if p in wanted]
        self.work_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=self.work_dir, prefix="outputs-") as spool:
            await asyncio.to_thread(export_to_file, order, spool, self.nix_env)
            spool.seek(0)
            if len(step_ids) == 1:
                await asyncio.to_thread(self.api.upload_outputs, step_ids[0], spool)
            else:
                await asyncio.to_thread(self.api.upload_outputs_of, step_ids, spool)


#: the share of a lease after the last successful renewal at which the worker stops
#: the builds it could not renew (before the server can re-lease them elsewhere)
FENCE_FRACTION = 0.8


class LeaseKeeper(threading.Thread):
    """Renews running steps' leases; heartbeats; follows new queue classes."""

    def __init__(self, builder: RemoteBuilder, lease_secs: float,
                 on_classes: Callable[[list[str]], None]) -> None:
        super().__init__(name="lease-keeper", daemon=True)
        self.builder = builder
        self.on_classes = on_classes
        self.renew_every = max(0.5, min(2.0, lease_secs / 3))
        self.lease_secs = lease_secs
        self._done = threading.Event()

    def heartbeat(self, timeout: float | None = None) -> dict[str, Any]:
        builder = self.builder
        caps = builder.capabilities
        return builder.api.heartbeat(sorted(caps.systems), sorted(caps.supported_features),
                                     sorted(caps.mandatory_features), builder.config.slots,
                                     len(builder.held()), timeout=timeout)

    def run(self) -> None:
        last_renewed = time.monotonic()
        next_beat = time.monotonic() + self.builder.config.heartbeat_secs
        while not self._done.wait(self.renew_every):
            held = self.builder.held()
            if held:
                # self-fencing: past this moment the server may hand the steps to
                # another builder; a renewal that hangs (a cut link never refuses,
                # it just drops packets) must not keep our builds running beyond it
                fence_at = last_renewed + self.lease_secs * FENCE_FRACTION
                sent = time.monotonic()
                try:
                    lost = self.builder.api.renew(held, timeout=max(0.5, fence_at - sent))
                    # the server extended the leases from when it got the request, which
                    # is no earlier than when it was sent
                    last_renewed = sent
                    if lost:
                        self.builder.take_away(lost)
                except Failure as exc:
                    log.warning("could not renew %d lease(s): %s", len(held), exc)
                    # the next try would come too late: stop them now
                    if time.monotonic() + self.renew_every >= fence_at and \
                            self.builder.take_away(set(held)):
                        log.error("leases about to lapse without renewal; stopped the builds")
            else:
                last_renewed = time.monotonic()
            if time.monotonic() >= next_beat:
                next_beat = time.monotonic() + self.builder.config.heartbeat_secs
                # while steps are held, this thread must be back for the next renewal
                # (and fencing) on time, whatever the link does; and a beat sent into a
                # cut link must not outlive its interval either, or the worker is heard
                # from again only after the client's whole request timeout
                timeout = self.renew_every if held else self.builder.config.heartbeat_secs
                try:
                    self.on_classes(list(self.heartbeat(timeout)["classes"]))
                except Failure as exc:
                    log.warning("heartbeat failed: %s", exc)
                except Exception:
                    log.exception("following the queue classes failed")

    def stop(self) -> None:
        self._done.set()
