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
import functools
import logging
import tempfile
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from sqlalchemy.exc import SQLAlchemyError

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


class _Assignment:
    """One assignment's state and the rules its capabilities enforce.

    The Cap'n Proto servers (:func:`_servers`) only adapt calls to these methods.
    """

    def __init__(self, step_id: int, log_path: Path, max_log_size: int,
                 nix_env: Mapping[str, str], input_closure: list[str],
                 on_log: Callable[[int], None] | None, on_report: Callable[[], None] | None,
                 outputs: Collection[str], leased: Callable[[], bool],
                 lease_held: Callable[[], Awaitable[bool]] | None) -> None:
        self.step_id = step_id
        self.max_log_size = max_log_size
        self.nix_env = nix_env
        self.input_closure = input_closure
        self.on_log = on_log
        self.on_report = on_report
        self.leased = leased
        self.lease_held = lease_held
        self.result: asyncio.Future[ReportedResult] = \
            asyncio.get_running_loop().create_future()
        self.log_bytes = 0
        self.truncated = False
        self.imported: list[str] = []
        self.import_error: str | None = None
        self.already_valid: list[str] = []
        self.refused = ""
        self.log_path = log_path
        #: why writing the log stopped (its filesystem is full, say), if it did
        self.log_broken: OSError | None = None
        self.log_file: IO[bytes] | None = None
        try:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            self.log_file = log_path.open("ab")
        except OSError as exc:
            self._log_failed(exc)
        self.allowed_inputs = set(input_closure)
        self.allowed_outputs = frozenset(outputs)
        #: the output stream being received (at most one file)
        self.spool: list[IO[bytes]] = []

    # ------------------------------------------------------------ leases

    def require_lease(self) -> None:
        if not self.leased():
            raise Refused(not_leased(self.step_id))

    async def require_lease_held(self) -> None:
        self.require_lease()
        if self.lease_held is None:
            return
        try:
            held = await self.lease_held()
        except SQLAlchemyError:
            # nothing is imported unchecked; the agent reports the step aborted (retried)
            raise Refused(f"step {self.step_id}: the runner's database is unavailable; "
                          "cannot check the lease") from None
        if not held:
            raise Refused(not_leased(self.step_id))

    def refuse(self, reason: str) -> Refused:
        self.refused = reason
        self.drop_spool()
        log.warning("step %s: %s", self.step_id, reason)
        return Refused(reason)

    def drop_spool(self) -> None:
        for handle in self.spool:
            handle.close()
        self.spool.clear()

    # ------------------------------------------------------------ LogSink

    def write_log(self, chunk: bytes) -> None:
        data = bytes(chunk)
        if len(data) > MAX_LOG_CHUNK:
            raise LimitExceeded("log chunk larger than 1 MiB")
        room = self.max_log_size - self.log_bytes
        if room <= 0:
            self.truncated = True
            return
        data = data[:room]
        if self.log_file is not None:
            try:
                self.log_file.write(data)
                self.log_file.flush()
            except OSError as exc:
                self._log_failed(exc)
        self.log_bytes += len(data)
        if self.on_log is not None:
            self.on_log(len(data))

    def _log_failed(self, exc: OSError) -> None:
        """A log is never worth a build (as ``StepLog``): the log stops here, the step
        goes on (found by tests/faults: a full log filesystem failed every agent step)."""
        if self.log_broken is None:
            self.log_broken = exc
            log.warning("step %s: cannot write the build log %s (%s); the rest is lost",
                        self.step_id, self.log_path, exc)
        self.close_log()

    def close_log(self) -> None:
        handle, self.log_file = self.log_file, None
        if handle is None:
            return
        try:
            handle.close()
        except OSError as exc:   # what was buffered is lost with the rest
            self._log_failed(exc)

    # ------------------------------------------------------------ OutputSink

    async def missing_outputs(self, paths: Any) -> list[str]:
        await self.require_lease_held()
        try:
            wanted = checked_paths(check_list("paths", paths, 100_000, MAX_STORE_PATH))
        except StoreError as exc:
            raise Refused(str(exc)) from None
        # an output's closure is the outputs plus (some of) the step's inputs; the
        # agent learns nothing about any other path of this store
        stray = [p for p in wanted
                 if p not in self.allowed_outputs and p not in self.allowed_inputs]
        if stray:
            raise Refused(f"refused: {stray[0]} is neither an output nor an input of "
                          f"step {self.step_id}")
        missing = await invalid_paths(wanted, self.nix_env)
        self.already_valid = sorted(set(wanted) - set(missing))
        return missing

    async def spool_outputs(self, chunk: bytes) -> None:
        self.require_lease()
        if self.refused:
            raise Refused(self.refused)
        if not self.spool:
            # closed by import_outputs(), refuse() or the report, whichever comes first
            self.spool.append(tempfile.TemporaryFile(prefix="circus-outputs-"))  # noqa: SIM115
        await asyncio.to_thread(self.spool[0].write, bytes(chunk))

    async def import_outputs(self) -> None:
        """Import the spooled stream once every path in it is one of the step's outputs."""
        await self.require_lease_held()
        if self.refused:
            raise Refused(self.refused)
        if not self.spool:
            return
        handle = self.spool[0]
        try:
            await asyncio.to_thread(verify_export, handle, self.allowed_outputs,
                                    f"step {self.step_id}")
        except ExportRefused as exc:
            raise self.refuse(str(exc)) from None
        try:
            self.imported = await import_file(handle, self.nix_env)
        except (StoreError, OSError) as exc:
            self.import_error = str(exc)
            raise
        finally:
            handle.close()
            self.spool.clear()

    # ------------------------------------------------------------ ResultSink

    def report(self, outcome: Any, exit_code: int, times: Any, outputs: Any,
               error_message: str) -> None:
        if self.result.done():
            # exactly once: a second report is a protocol violation, ignored
            log.warning("step %s: duplicate result report ignored", self.step_id)
            return
        self.close_log()
        self.drop_spool()  # written but never closed: nothing was imported
        reported = ReportedResult(
            outcome=str(outcome), exit_code=int(exit_code),
            started_at=float(times.startedAt), finished_at=float(times.finishedAt),
            outputs=[ReportedOutput(o.name, o.path, o.narHash, int(o.narSize),
                                    int(o.closureSize)) for o in outputs],
            error_message=str(error_message), log_bytes=self.log_bytes,
            log_truncated=self.truncated, imported=list(self.imported),
            already_valid=list(self.already_valid))
        if self.import_error:
            reported.outcome = "importFailure"
            reported.error_message = f"importing outputs failed: {self.import_error}"
        if self.refused:
            reported.outcome, reported.refused = "aborted", self.refused
            reported.error_message = self.refused
        if self.on_report is not None:
            self.on_report()
        self.result.set_result(reported)

    # ------------------------------------------------------------ InputSource

    async def send_inputs(self, paths: Any, sink: Any) -> None:
        self.require_lease()
        wanted = [str(p) for p in paths]
        # only what the assignment named: an agent cannot read arbitrary store paths
        if not set(wanted) <= self.allowed_inputs:
            raise LimitExceeded("fetch asked for paths outside the input closure")
        order = [p for p in self.input_closure if p in set(wanted)]
        async for chunk in export_chunks(order, self.nix_env):
            await sink.write(chunk)
        await sink.close()


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
    assignment = _Assignment(step_id, log_path, max_log_size, nix_env, input_closure,
                             on_log, on_report, outputs, leased, lease_held)
    servers = _servers()
    return StepSinks(servers.log(assignment), servers.output(assignment),
                     servers.result(assignment), servers.input(assignment),
                     assignment.result)


@dataclass(frozen=True)
class _Servers:
    log: Any
    output: Any
    result: Any
    input: Any


@functools.cache
def _servers() -> _Servers:
    """The Cap'n Proto server classes (the schema is loaded at run time, once)."""
    proto = schema()

    class LogSinkImpl(proto.LogSink.Server):  # type: ignore[misc,name-defined]
        def __init__(self, assignment: _Assignment) -> None:
            self.assignment = assignment

        async def write(self, chunk: bytes, _context: Any, **kwargs: Any) -> None:
            self.assignment.write_log(chunk)

        async def close(self, _context: Any, **kwargs: Any) -> None:
            self.assignment.close_log()

    class OutputSinkImpl(proto.OutputSink.Server):  # type: ignore[misc,name-defined]
        def __init__(self, assignment: _Assignment) -> None:
            self.assignment = assignment

        async def missing(self, paths: Any, _context: Any, **kwargs: Any) -> list[str]:
            return await self.assignment.missing_outputs(paths)

        async def write(self, chunk: bytes, _context: Any, **kwargs: Any) -> None:
            await self.assignment.spool_outputs(chunk)

        async def close(self, _context: Any, **kwargs: Any) -> None:
            await self.assignment.import_outputs()

    class ResultSinkImpl(proto.ResultSink.Server):  # type: ignore[misc,name-defined]
        def __init__(self, assignment: _Assignment) -> None:
            self.assignment = assignment

        async def report(self, outcome: Any, exitCode: int, times: Any,
                         outputs: Any, errorMessage: str, _context: Any, **kwargs: Any
                         ) -> None:
            self.assignment.report(outcome, exitCode, times, outputs, errorMessage)

    class InputSourceImpl(proto.InputSource.Server):  # type: ignore[misc,name-defined]
        def __init__(self, assignment: _Assignment) -> None:
            self.assignment = assignment

        async def fetch(self, paths: Any, sink: Any, _context: Any, **kwargs: Any) -> None:
            await self.assignment.send_inputs(paths, sink)

    return _Servers(LogSinkImpl, OutputSinkImpl, ResultSinkImpl, InputSourceImpl)


async def wait_result(sinks: StepSinks, disconnected: Awaitable[Any]) -> ReportedResult | None:
    """The agent's report, or None when the connection went away first."""
    lost = asyncio.ensure_future(disconnected)
    done, _ = await asyncio.wait({sinks.result, lost}, return_when=asyncio.FIRST_COMPLETED)
    lost.cancel()
    if sinks.result in done:
        return sinks.result.result()
    return None
