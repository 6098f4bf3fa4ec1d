"""A hand-driven agent for attack tests: raw Cap'n Proto against a running gateway.

Every raw client runs in its own thread with its own event loop (``run_agent``),
joined with a timeout, so a failing or hanging attack can never leave an event
loop running in pytest's main thread.
"""

from __future__ import annotations

import asyncio
import secrets
import struct
import tempfile
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from circus.common.nix import nar
from circus.common.nix.export import EXPORT_MAGIC
from circus.protocol import protocol_version, schema

T = TypeVar("T")
BASE32 = "0123456789abcdfghijklmnpqrsvwxyz"


def run_agent(scenario: Callable[[], Awaitable[T]], timeout: float = 60) -> T:
    """Run ``scenario()`` on a fresh loop (with pycapnp's) in a thread; its result."""
    import capnp

    box: dict[str, Any] = {}

    def main() -> None:
        try:
            box["value"] = asyncio.run(capnp.run(
                asyncio.wait_for(scenario(), timeout)))
        except BaseException as exc:  # handed to the test's thread
            box["error"] = exc

    thread = threading.Thread(target=main, name="raw-agent", daemon=True)
    thread.start()
    thread.join(timeout + 10)
    if thread.is_alive():
        raise AssertionError(f"the raw agent did not finish within {timeout}s")
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]


async def refusal(call: Awaitable[Any]) -> str:
    """The remote error text of ``call`` ('' when it succeeded)."""
    import capnp

    try:
        await call
    except capnp.KjException as exc:
        return str(exc)
    return ""


@dataclass
class Assigned:
    step_id: int
    build_id: int
    drv_path: str
    expected_outputs: list[str]
    input_closure: list[str]
    log_sink: Any
    result_sink: Any
    output_sink: Any
    inputs: Any


class RawAgent:
    """Registers like ``circus-agent`` does, then lets the test misbehave."""

    def __init__(self, port: int, token: str, name: str = "raw", max_jobs: int = 1,
                 machine_id: str | None = None) -> None:
        self.port = port
        self.info = {
            "hostname": "raw-host", "name": name, "machineId": machine_id or secrets.token_hex(16),
            "systems": ["x86_64-linux"], "supportedFeatures": [], "mandatoryFeatures": [],
            "speedFactor": 1.0, "cpuCount": 1, "maxJobs": max_jobs,
            "protoVersion": protocol_version(), "authToken": token, "ephemeral": False,
            "agentVersion": "raw-test"}
        self.assignments: asyncio.Queue[Assigned] = asyncio.Queue()
        self.stream: Any = None
        self.runner: Any = None
        self.session: Any = None
        self.session_id = ""

    @property
    def machine_id(self) -> str:
        return str(self.info["machineId"])

    async def connect(self) -> RawAgent:
        import capnp

        proto = schema()
        self.stream = await capnp.AsyncIoStream.create_connection(host="127.0.0.1",
                                                                  port=self.port)
        self.runner = capnp.TwoPartyClient(self.stream).bootstrap().cast_as(proto.Runner)
        return self

    async def register(self) -> RawAgent:
        if self.runner is None:
            await self.connect()
        answer = await self.runner.register(self.info, self._builder())
        self.session, self.session_id = answer.session, str(answer.sessionId)
        return self

    def _builder(self) -> Any:
        proto = schema()
        queue = self.assignments

        class CapturingBuilder(proto.Builder.Server):  # type: ignore[misc,name-defined]
            async def assign(self, job: Any, logSink: Any, resultSink: Any, outputSink: Any,
                             inputs: Any, _context: Any, **kwargs: Any) -> tuple[bool, str]:
                queue.put_nowait(Assigned(
                    int(job.stepId), int(job.buildId), str(job.drvPath),
                    list(job.expectedOutputs), list(job.inputClosure),
                    logSink, resultSink, outputSink, inputs))
                return True, ""

            async def abort(self, stepId: int, _context: Any, **kwargs: Any) -> None:
                pass

            async def shutdown(self, reason: str, _context: Any, **kwargs: Any) -> None:
                pass

        return CapturingBuilder()

    async def next_assignment(self, timeout: float = 30) -> Assigned:
        return await asyncio.wait_for(self.assignments.get(), timeout)

    async def heartbeat(self) -> bool:
        beat = {"load1": 0.1, "load5": 0.1, "load15": 0.1, "memTotal": 1, "memUsed": 1,
                "storeFree": 1, "buildDirFree": 1, "currentJobs": 0, "hasPressure": False}
        return bool((await self.session.heartbeat(beat)).ok)

    async def report(self, job: Assigned, outcome: str = "success") -> None:
        await job.result_sink.report(outcome=outcome, exitCode=0,
                                     times={"startedAt": 1.0, "finishedAt": 2.0},
                                     outputs=[], errorMessage="")

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()


def fake_store_path(name: str) -> str:
    """A well-formed store path that no store has."""
    return "/nix/store/" + "".join(secrets.choice(BASE32) for _ in range(32)) + "-" + name


def _u64(value: int) -> bytes:
    return struct.pack("<Q", value)


def _token(data: bytes) -> bytes:
    return _u64(len(data)) + data + b"\0" * (-len(data) % 8)


def export_of(entries: list[tuple[str, bytes]],
              references: Mapping[str, Sequence[str]] | None = None) -> bytes:
    """A ``nix-store --export`` stream claiming each path holds a file with that content
    (and the ``references`` given for it, none by default)."""
    out = bytearray()
    with tempfile.TemporaryDirectory() as scratch:
        for path, content in entries:
            file = Path(scratch) / "f"
            file.write_bytes(content)
            refs = (references or {}).get(path, ())
            out += _u64(1) + b"".join(nar.dump(file)) + _u64(EXPORT_MAGIC)
            out += _token(path.encode()) + _u64(len(refs))
            out += b"".join(_token(ref.encode()) for ref in refs) + _token(b"") + _u64(0)
    return bytes(out + _u64(0))
