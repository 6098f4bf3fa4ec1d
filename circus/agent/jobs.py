"""Running one assignment on the agent: fetch inputs, build, send outputs, report."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from circus.agent.upload import UploadFailed, upload_outputs
from circus.common.nix.realise import Outcome, RealiseResult, realise
from circus.common.nix.store import StoreError, dependency_order
from circus.common.nix.store.aio import derivation_outputs, invalid_paths, path_infos
from circus.common.nix.transfer import Importer, export_chunks
from circus.protocol import schema
from circus.protocol.limits import MAX_LOG_CHUNK

log = logging.getLogger(__name__)

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


async def run_job(job: Job, assignment: Any, log_sink: Any, result_sink: Any,
                  output_sink: Any, inputs: Any, environment: JobEnvironment) -> None:
    """Do the whole assignment and report exactly once (unless the connection is gone)."""
    env = environment.nix_env
    started = time.time()
    outcome: str = "aborted"
    exit_code = -1
    error = ""
    outputs: list[dict[str, Any]] = []

    phases: dict[str, float] = {}
    mark = time.monotonic()

    def phase(name: str) -> None:
        nonlocal mark
        now = time.monotonic()
        phases[name] = round((now - mark) * 1000, 1)
        mark = now

    async def report() -> None:
        phase("outputs")
        log.debug("step %s %s in %s ms", job.step_id, outcome, phases)
        await result_sink.report(
            outcome=outcome, exitCode=exit_code,
            times={"startedAt": started, "finishedAt": time.time()},
            outputs=outputs, errorMessage=error[:4000])

    # 1. inputs the agent lacks come from the runner
    try:
        wanted = list(assignment.inputClosure)
        if job.drv_path not in wanted:
            wanted.append(job.drv_path)
        missing = await invalid_paths(wanted, env)
        if missing:
            sink, imported = make_import_sink(env)
            await inputs.fetch(missing, sink)
            arrived = set(await imported)
            unarrived = [p for p in missing if p not in arrived]
            if unarrived:
                raise StoreError(f"{unarrived[0]} is not in the store after the import")
    except (StoreError, OSError) as exc:
        outcome, error = "importFailure", f"could not fetch inputs: {exc}"
        await report()
        return

    phase("inputs")
    # 2. build, streaming the log
    pending = bytearray()

    async def send_log(chunk: bytes) -> None:
        pending.extend(chunk)
        while len(pending) >= MAX_LOG_CHUNK:
            await log_sink.write(bytes(pending[:MAX_LOG_CHUNK]))
            del pending[:MAX_LOG_CHUNK]
        if pending:
            await log_sink.write(bytes(pending))
            pending.clear()

    expected = list(assignment.expectedOutputs)
    result: RealiseResult = await realise(
        job.drv_path, env=env,
        timeout=assignment.buildTimeout or None,
        max_silent=assignment.maxSilentTime or None,
        max_log_size=min(int(assignment.maxLogSize or environment.max_log_size),
                         environment.max_log_size),
        on_log=send_log, extra_args=environment.nix_args(list(assignment.extraNixArgs)),
        cores=environment.cores,
        cancel=job.cancel, output_paths=expected)
    try:
        await log_sink.close()
    except Exception:  # the log is best effort; the result is what counts
        log.warning("could not close the log of step %s", job.step_id, exc_info=True)
    phase("build")
    exit_code = result.returncode if result.returncode is not None else -1
    outcome = WIRE_OUTCOME[result.outcome]
    error = result.error_message or ""

    # 3. outputs travel to the runner (only what it lacks)
    if result.outcome in (Outcome.success, Outcome.failed_with_output):
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
            outputs = [{"name": names.get(p, "out"), "path": p, "narHash": infos[p].nar_hash_sri,
                        "narSize": infos[p].nar_size, "closureSize": infos[p].closure_size or 0}
                       for p in output_paths]
        except (StoreError, OSError) as exc:
            outcome, error = "postProcessFailure", f"could not send outputs: {exc}"
        presign = assignment.presign
        if outputs and presign.enabled and environment.runner is not None:
            try:
                await upload_outputs(environment.runner, environment.machine_id, job.build_id,
                                     job.step_id, infos, output_paths,
                                     presign.compression or "zstd", presign.level or 3)
            except (UploadFailed, OSError) as exc:
                log.warning("step %s: %s", job.step_id, exc)
                if presign.failBuildOnUploadError:
                    outcome, error = "uploadFailure", str(exc)
    await report()


def _output_names(drv_path: str) -> dict[str, str]:
    """Output path → output name, read from the .drv (no Nix call)."""
    from circus.common.nix.derivation import read_derivation

    try:
        drv = read_derivation(drv_path)
    except (OSError, ValueError):
        return {}
    return {path: name for name, path in drv.output_paths.items()}
