"""Running one assignment on the agent: fetch inputs, build, send outputs, report."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from circus.agent.upload import UploadFailed, upload_outputs
from circus.common.nix.realise import Outcome, RealiseResult, realise
from circus.common.nix.store import StoreError, dependency_order
from circus.common.nix.store.aio import build_log, derivation_outputs, invalid_paths, path_infos
from circus.common.nix.transfer import Importer, export_chunks
from circus.protocol import error_summary, schema
from circus.protocol.limits import MAX_LOG_CHUNK

log = logging.getLogger(__name__)

#: the line before the log Nix kept of a build an earlier attempt made (:func:`_build`)
KEPT_LOG_NOTE = (b"[circus: the outputs were already valid on this agent, built by an "
                 b"earlier attempt; the build's log as Nix kept it follows]")

#: how our outcomes travel on the wire
WIRE_OUTCOME = {
    Outcome.success: "success",
    Outcome.failed: "buildFailure",
    Outcome.failed_with_output: "failedWithOutput",
    Outcome.timed_out: "timedOut",
    Outcome.log_limit_exceeded: "logLimitExceeded",
    Outcome.oom_killed: "oomKilled",
    Outcome.aborted: "aborted",
    Outcome.cancelled: "aborted",
}


def make_import_sink(env: Mapping[str, str]) -> tuple[Any, asyncio.Future[list[str]]]:
    """An agent-side ByteSink that feeds ``nix-store --import``; the future gets the paths."""
    proto = schema()
    done: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
    importer = Importer(env)

    class ImportSink(proto.ByteSink.Server):  # type: ignore[misc,name-defined]
        async def write(self, chunk: bytes, _context: Any, **kwargs: Any) -> None:
            await importer.write(bytes(chunk))

        async def close(self, _context: Any, **kwargs: Any) -> None:
            try:
                done.set_result(await importer.close())
            except StoreError as exc:
                done.set_exception(exc)

    return ImportSink(), done


@dataclass
class Job:
    step_id: int
    build_id: int
    drv_path: str
    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


@dataclass
class JobEnvironment:
    nix_env: dict[str, str]
    max_log_size: int
    cores: int
    #: features this agent advertises; Nix must accept derivations requiring them
    system_features: list[str] = field(default_factory=list)
    #: the Runner capability of the current connection (presigned uploads)
    runner: Any = None
    machine_id: str = ""

    def nix_args(self, extra: list[str]) -> list[str]:
        args = list(extra)
        if self.system_features:
            args += ["--option", "system-features", " ".join(sorted(self.system_features))]
        return args


@dataclass
class _JobReport:
    """What the agent reports about one job, sent exactly once; milliseconds per phase
    go to the debug log."""

    step_id: int
    started: float = field(default_factory=time.time)
    outcome: str = "aborted"
    exit_code: int = -1
    error: str = ""
    outputs: list[dict[str, Any]] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)
    _mark: float = field(default_factory=time.monotonic)

    def phase(self, name: str) -> None:
        now = time.monotonic()
        self.phases[name] = round((now - self._mark) * 1000, 1)
        self._mark = now

    async def send(self, result_sink: Any) -> None:
        self.phase("outputs")
        log.debug("step %s %s in %s ms", self.step_id, self.outcome, self.phases)
        await result_sink.report(
            outcome=self.outcome, exitCode=self.exit_code,
            times={"startedAt": self.started, "finishedAt": time.time()},
            outputs=self.outputs, errorMessage=self.error[:4000])


async def run_job(job: Job, assignment: Any, log_sink: Any, result_sink: Any,
                  output_sink: Any, inputs: Any, environment: JobEnvironment) -> None:
    """Do the whole assignment and report exactly once (unless the connection is gone):
    fetch the inputs this store lacks, build streaming the log, send the outputs the
    runner lacks (and upload them to the cache when the runner asks for it)."""
    report = _JobReport(job.step_id)
    try:
        await _do_job(job, assignment, log_sink, output_sink, inputs, environment, report)
    except Exception as exc:
        # a call to the runner failed (its database restarting, say): without a report
        # the runner would wait for this step as long as the connection lasts; aborted
        # is an infrastructure outcome, so the step is built again
        log.warning("step %s: %s", job.step_id, error_summary(exc))
        report.outcome, report.error = "aborted", \
            f"the agent could not complete the step: {error_summary(exc)}"
    await report.send(result_sink)


async def _do_job(job: Job, assignment: Any, log_sink: Any, output_sink: Any, inputs: Any,
                  environment: JobEnvironment, report: _JobReport) -> None:
    """The assignment's work; what became of it goes into ``report``."""
    try:
        await _fetch_inputs(job, assignment, inputs, environment.nix_env)
    except (StoreError, OSError) as exc:
        report.outcome, report.error = "importFailure", f"could not fetch inputs: {exc}"
        return
    report.phase("inputs")
    result = await _build(job, assignment, log_sink, environment)
    report.phase("build")
    report.exit_code = result.returncode if result.returncode is not None else -1
    report.outcome = WIRE_OUTCOME[result.outcome]
    report.error = result.error_message or ""
    if result.outcome in (Outcome.success, Outcome.failed_with_output):
        await _deliver_outputs(job, assignment, output_sink, environment, report)


async def _fetch_inputs(job: Job, assignment: Any, inputs: Any, env: dict[str, str]) -> None:
    """The inputs (and the .drv) this store lacks come from the runner; raises
    ``StoreError`` when one did not arrive."""
    wanted = list(assignment.inputClosure)
    if job.drv_path not in wanted:
        wanted.append(job.drv_path)
    missing = await invalid_paths(wanted, env)
    if not missing:
        return
    sink, imported = make_import_sink(env)
    await inputs.fetch(missing, sink)
    arrived = set(await imported)
    unarrived = [p for p in missing if p not in arrived]
    if unarrived:
        raise StoreError(f"{unarrived[0]} is not in the store after the import")


async def _build(job: Job, assignment: Any, log_sink: Any, environment: JobEnvironment
                 ) -> RealiseResult:
    """Realise the derivation, streaming its log in chunks the runner accepts."""
    pending = bytearray()

    async def send_log(chunk: bytes) -> None:
        pending.extend(chunk)
        while len(pending) >= MAX_LOG_CHUNK:
            await log_sink.write(bytes(pending[:MAX_LOG_CHUNK]))
            del pending[:MAX_LOG_CHUNK]
        if pending:
            await log_sink.write(bytes(pending))
            pending.clear()

    # outputs already valid here: an earlier attempt on this agent built them, and its
    # lines may have gone to a runner that died (kill -9 of the queue runner: the
    # restarted one finds no log of that build); this attempt builds nothing
    wanted = list(assignment.expectedOutputs)
    built_before = bool(wanted) and not await invalid_paths(wanted, environment.nix_env)
    result: RealiseResult = await realise(
        job.drv_path, env=environment.nix_env,
        timeout=assignment.buildTimeout or None,
        max_silent=assignment.maxSilentTime or None,
        max_log_size=min(int(assignment.maxLogSize or environment.max_log_size),
                         environment.max_log_size),
        on_log=send_log, extra_args=environment.nix_args(list(assignment.extraNixArgs)),
        cores=environment.cores,
        cancel=job.cancel, output_paths=list(assignment.expectedOutputs))
    if built_before and result.outcome in (Outcome.success, Outcome.failed_with_output):
        await _send_kept_log(job, environment, send_log)
    try:
        await log_sink.close()
    except Exception:  # the log is best effort; the result is what counts
        log.warning("could not close the log of step %s", job.step_id, exc_info=True)
    return result


async def _send_kept_log(job: Job, environment: JobEnvironment,
                         send_log: Callable[[bytes], Awaitable[None]]) -> None:
    """The log Nix kept of the build of the step's outputs, after a note: the step's log
    on the runner then holds that build whatever became of the attempt that made it."""
    try:
        kept = await build_log(job.drv_path, environment.nix_env)
    except StoreError as exc:
        log.warning("step %s: could not read the log Nix kept: %s", job.step_id, exc)
        return
    if kept:
        await send_log(KEPT_LOG_NOTE + b"\n" + kept + (b"" if kept.endswith(b"\n") else b"\n"))


async def _deliver_outputs(job: Job, assignment: Any, output_sink: Any,
                           environment: JobEnvironment, report: _JobReport) -> None:
    """Send the outputs' closure the runner lacks, then upload the outputs to the
    cache when the runner asked for presigned uploads; failures go into ``report``."""
    env = environment.nix_env
    try:
        names = _output_names(job.drv_path)
        output_paths = list(names) or await derivation_outputs(job.drv_path, env)
        # one Nix call: the closure with its references, ordered dependencies first
        infos = await path_infos(output_paths, env, recursive=True, closure_size=True)
        needed = dependency_order(infos)
        lacking = set((await output_sink.missing(needed)).missing)
        to_send = [p for p in needed if p in lacking]
        if to_send:
            async for chunk in export_chunks(to_send, env):
                await output_sink.write(chunk)
        await output_sink.close()
        report.outputs = [
            {"name": names.get(p, "out"), "path": p, "narHash": infos[p].nar_hash_sri,
             "narSize": infos[p].nar_size, "closureSize": infos[p].closure_size or 0}
            for p in output_paths]
    except (StoreError, OSError) as exc:
        report.outcome, report.error = "postProcessFailure", f"could not send outputs: {exc}"
        return
    presign = assignment.presign
    if not (report.outputs and presign.enabled and environment.runner is not None):
        return
    try:
        await upload_outputs(environment.runner, environment.machine_id, job.build_id,
                             job.step_id, infos, output_paths,
                             presign.compression or "zstd", presign.level or 3)
    except (UploadFailed, OSError) as exc:
        log.warning("step %s: %s", job.step_id, exc)
        if presign.failBuildOnUploadError:
            report.outcome, report.error = "uploadFailure", str(exc)


def _output_names(drv_path: str) -> dict[str, str]:
    """Output path → output name, read from the .drv (no Nix call)."""
    from circus.common.nix.derivation import read_derivation

    try:
        drv = read_derivation(drv_path)
    except (OSError, ValueError):
        return {}
    return {path: name for name, path in drv.output_paths.items()}
