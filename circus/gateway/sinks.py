"""Runner-side capabilities handed to an agent with each assignment.

``LogSink`` appends to the step's log file (the same file local builds write,
so the API's live tail works for agents too); ``OutputSink`` tells the agent
which output paths this store lacks and imports what it streams — only while
the step is leased to that agent, and only when every path in the stream is
one of the step's outputs (the stream is spooled and read in full first, so a
stray path never reaches ``nix-store --import``);
``InputSource`` streams the inputs the agent lacks; ``ResultSink`` accepts the
one result report and hands it to the queue runner.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from circus.common.nix.export import ExportRefused, verify_export
from circus.common.nix.store import StoreError, checked_paths
from circus.common.nix.store.aio import invalid_paths
from circus.common.nix.transfer import export_chunks, import_file
from circus.gateway.server import Refused, not_leased
from circus.protocol import schema
from circus.protocol.limits import MAX_LOG_CHUNK, MAX_STORE_PATH, LimitExceeded, check_list

log = logging.getLogger(__name__)


@dataclass
class ReportedOutput:
    name: str
    path: str
    nar_hash: str
    nar_size: int
    closure_size: int


@dataclass
class ReportedResult:
    """What an agent said about one step (its ``ResultSink.report``)."""

    outcome: str
    exit_code: int
    started_at: float
    finished_at: float
    outputs: list[ReportedOutput] = field(default_factory=list)
    error_message: str = ""
    #: paths the agent asked about that were already valid here (``OutputSink.missing``)
    already_valid: list[str] = field(default_factory=list)
    #: bytes of log received, and whether the runner-side log cap cut it
    log_bytes: int = 0
    log_truncated: bool = False
    imported: list[str] = field(default_factory=list)
    #: why the runner refused what the agent sent (paths that are not the step's
    #: outputs); such a step ends aborted, without another attempt
    refused: str = ""


@dataclass
class StepSinks:
    """The capabilities of one assignment and what they collected."""

    log_sink: Any
    output_sink: Any
    result_sink: Any
    input_source: Any
    result: asyncio.Future[ReportedResult]


def make_sinks(step_id: int, log_path: Path, max_log_size: int, nix_env: Mapping[str, str],
               input_closure: list[str], on_log: Callable[[int], None] | None = None,
               on_report: Callable[[], None] | None = None, *,
               outputs: Collection[str],
               leased: Callable[[], bool] = lambda: True,
               lease_held: Callable[[], Awaitable[bool]] | None = None) -> StepSinks:
    """The capabilities of one assignment.

    ``outputs`` are the step's output paths, the only ones an import may add;
    ``leased`` says (cheaply) whether the step is still this agent's, and
    ``lease_held`` asks the database too (before anything is imported).
    """
    proto = schema()
    result: asyncio.Future[ReportedResult] = asyncio.get_running_loop().create_future()
    state: dict[str, Any] = {"log_bytes": 0, "truncated": False, "imported": [],
                             "import_error": None, "already_valid": [], "refused": ""}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_file = log_path.open("ab")
    allowed_inputs = set(input_closure)
    allowed_outputs = frozenset(outputs)
    spool: list[IO[bytes]] = []

    def require_lease() -> None:
        if not leased():
            raise Refused(not_leased(step_id))

    async def require_lease_held() -> None:
        require_lease()
        if lease_held is not None and not await lease_held():
            raise Refused(not_leased(step_id))

    def refuse(reason: str) -> Refused:
        state["refused"] = reason
        for handle in spool:
            handle.close()
        spool.clear()
        log.warning("step %s: %s", step_id, reason)
        return Refused(reason)

    class LogSinkImpl(proto.LogSink.Server):  # type: ignore[misc,name-defined]
        async def write(self, chunk: bytes, _context: Any, **kwargs: Any) -> None:
            data = bytes(chunk)
            if len(data) > MAX_LOG_CHUNK:
                raise LimitExceeded("log chunk larger than 1 MiB")
            room = max_log_size - state["log_bytes"]
            if room <= 0:
                state["truncated"] = True
                return
            data = data[:room]
            log_file.write(data)
            log_file.flush()
            state["log_bytes"] += len(data)
            if on_log is not None:
                on_log(len(data))

        async def close(self, _context: Any, **kwargs: Any) -> None:
            log_file.close()

    class OutputSinkImpl(proto.OutputSink.Server):  # type: ignore[misc,name-defined]
        async def missing(self, paths: Any, _context: Any, **kwargs: Any) -> list[str]:
            await require_lease_held()
            try:
                wanted = checked_paths(check_list("paths", paths, 100_000, MAX_STORE_PATH))
            except StoreError as exc:
                raise Refused(str(exc)) from None
            # an output's closure is the outputs plus (some of) the step's inputs; the
            # agent learns nothing about any other path of this store
            stray = [p for p in wanted if p not in allowed_outputs and p not in allowed_inputs]
            if stray:
                raise Refused(f"refused: {stray[0]} is neither an output nor an input of "
                              f"step {step_id}")
            missing = await invalid_paths(wanted, nix_env)
            state["already_valid"] = sorted(set(wanted) - set(missing))
            return missing

        async def write(self, chunk: bytes, _context: Any, **kwargs: Any) -> None:
            require_lease()
            if state["refused"]:
                raise Refused(state["refused"])
            if not spool:
                # closed by close(), refuse() or the report, whichever comes first
                spool.append(tempfile.TemporaryFile(prefix="circus-outputs-"))  # noqa: SIM115
            await asyncio.to_thread(spool[0].write, bytes(chunk))

        async def close(self, _context: Any, **kwargs: Any) -> None:
            await require_lease_held()
            if state["refused"]:
                raise Refused(state["refused"])
            if not spool:
                return
            handle = spool[0]
            try:
                await asyncio.to_thread(verify_export, handle, allowed_outputs,
                                        f"step {step_id}")
            except ExportRefused as exc:
                raise refuse(str(exc)) from None
            try:
                state["imported"] = await import_file(handle, nix_env)
            except (StoreError, OSError) as exc:
                state["import_error"] = str(exc)
                raise
            finally:
                handle.close()
                spool.clear()

    class ResultSinkImpl(proto.ResultSink.Server):  # type: ignore[misc,name-defined]
        async def report(self, outcome: Any, exitCode: int, times: Any,
                         outputs: Any, errorMessage: str, _context: Any, **kwargs: Any
                         ) -> None:
            if result.done():
                # exactly once: a second report is a protocol violation, ignored
                log.warning("step %s: duplicate result report ignored", step_id)
                return
            if not log_file.closed:
                log_file.close()
            for handle in spool:  # written but never closed: nothing was imported
                handle.close()
            spool.clear()
            reported = ReportedResult(
                outcome=str(outcome), exit_code=int(exitCode),
                started_at=float(times.startedAt), finished_at=float(times.finishedAt),
                outputs=[ReportedOutput(o.name, o.path, o.narHash, int(o.narSize),
                                        int(o.closureSize)) for o in outputs],
                error_message=str(errorMessage), log_bytes=state["log_bytes"],
                log_truncated=state["truncated"], imported=list(state["imported"]),
                already_valid=list(state["already_valid"]))
            if state["import_error"]:
                reported.outcome = "importFailure"
                reported.error_message = f"importing outputs failed: {state['import_error']}"
            if state["refused"]:
                reported.outcome, reported.refused = "aborted", state["refused"]
                reported.error_message = state["refused"]
            if on_report is not None:
                on_report()
            result.set_result(reported)

    class InputSourceImpl(proto.InputSource.Server):  # type: ignore[misc,name-defined]
        async def fetch(self, paths: Any, sink: Any, _context: Any, **kwargs: Any) -> None:
            require_lease()
            wanted = [str(p) for p in paths]
            # only what the assignment named: an agent cannot read arbitrary store paths
            if not set(wanted) <= allowed_inputs:
                raise LimitExceeded("fetch asked for paths outside the input closure")
            order = [p for p in input_closure if p in set(wanted)]
            async for chunk in export_chunks(order, nix_env):
                await sink.write(chunk)
            await sink.close()

    return StepSinks(LogSinkImpl(), OutputSinkImpl(), ResultSinkImpl(), InputSourceImpl(),
                     result)


async def wait_result(sinks: StepSinks, disconnected: Awaitable[Any]) -> ReportedResult | None:
    """The agent's report, or None when the connection went away first."""
    lost = asyncio.ensure_future(disconnected)
    done, _ = await asyncio.wait({sinks.result, lost}, return_when=asyncio.FIRST_COMPLETED)
    lost.cancel()
    if sinks.result in done:
        return sinks.result.result()
    return None
