"""Per-step build logs.

While a step runs its log is a plain file that grows (the API's SSE tail
follows it): ``<log_dir>/<first 2 chars of the drv hash>/<drv basename>-<step id>.log``.
When the step finishes the file is compressed to ``.log.zst`` (``logs.compress``)
and ``steps.log_path`` names the final file. Writing stops at the size limit.

A log is never worth a build: when the log directory cannot be written (a full
disk) the log stops there, with a note if one still fits, and the build goes on.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from pathlib import Path
from typing import BinaryIO

import zstandard

log = logging.getLogger(__name__)

TRUNCATED_MARKER = b"\n[circus: log truncated: the build exceeded the log size limit]\n"


#: bytes of the end of Nix's kept log looked for in the step's log (its lines arrive in
#: order: when the end is there, so is the rest)
KEPT_END = 4096


def log_path_for(log_dir: str | Path, drv_path: str, step_id: int) -> Path:
    base = os.path.basename(drv_path)
    return Path(log_dir) / base[:2] / f"{base}-{step_id}.log"


class StepLog:
    """A step's log being written; bytes beyond ``limit`` are counted, not stored."""

    def __init__(self, path: Path, limit: int) -> None:
        self.path = path
        self.limit = limit
        #: bytes the builder produced (also those beyond the limit)
        self.size = 0
        self._handle: BinaryIO | None = None
        self._truncated = False
        self._closed = False
        #: why writing stopped (the log directory could not be written), if it did
        self.broken: OSError | None = None
        # the Nix reader thread writes while the worker thread may finalize
        self._lock = threading.Lock()

    @property
    def over_limit(self) -> bool:
        return self.size > self.limit

    def _open(self) -> BinaryIO:
        if self._handle is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # unbuffered enough for a live tail: flushed per line below
            self._handle = open(self.path, "ab")  # noqa: SIM115 - closed in close()
        return self._handle

    def _failed(self, exc: OSError) -> None:
        """Stop writing (caller holds the lock); the build is not affected."""
        if self.broken is None:
            self.broken = exc
            log.warning("cannot write the build log %s (%s); the rest is lost", self.path, exc)
        if self._handle is not None:
            try:
                self._handle.close()
            except OSError:
                pass   # what was buffered is lost with the rest
            self._handle = None

    def write(self, data: bytes) -> None:
        with self._lock:
            if self._closed or self.broken is not None:
                self.size += len(data)
                return
            before = self.size
            self.size += len(data)
            try:
                handle = self._open()
                if before < self.limit:
                    handle.write(data[: self.limit - before])
                    handle.flush()
                if self.size > self.limit and not self._truncated:
                    self._truncated = True
                    handle.write(TRUNCATED_MARKER)
                    handle.flush()
            except OSError as exc:
                self._failed(exc)

    def touch(self) -> None:
        """Create the file (a build with no output still has a log)."""
        with self._lock:
            if not self._closed and self.broken is None:
                try:
                    self._open()
                except OSError as exc:
                    self._failed(exc)

    def note(self, text: str) -> None:
        """A line from Circus or Nix itself (not counted against the builder's limit)."""
        with self._lock:
            if self._closed or self.broken is not None:
                return
            try:
                handle = self._open()
                handle.write(text.encode(errors="replace") + b"\n")
                handle.flush()
            except OSError as exc:
                self._failed(exc)

    def add_kept(self, kept: bytes, note: str) -> bool:
        """Append ``kept``, the log Nix kept of a build no attempt of this step followed
        to its end, after ``note``, unless the step's log holds its end already; returns
        whether it was added (counted against the limit like the builder's own bytes)."""
        end = kept.rstrip(b"\n")[-KEPT_END:]
        try:
            held = logged(self.path)
        except (OSError, zstandard.ZstdError):
            held = b""   # unreadable: adding the whole log again loses nothing
        if not end or end in held:
            return False
        self.note(note)
        self.write(kept if kept.endswith(b"\n") else kept + b"\n")
        return True

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._handle is not None:
                try:
                    self._handle.close()
                except OSError as exc:
                    self._failed(exc)
                self._handle = None
            if self.broken is not None and self.path.exists():
                # best effort: the space may be back, or not
                try:
                    with open(self.path, "ab") as handle:
                        handle.write(f"\n[circus: log incomplete: {self.broken}]\n".encode())
                except OSError:
                    pass

    def finalize(self, compress: bool) -> tuple[str | None, int]:
        """Close, compress when asked; returns (final path, builder bytes)."""
        self.close()
        wrote = self.path.exists() and self.path.stat().st_size > 0
        final = final_log(self.path, compress)
        if final is None:
            return None, self.size
        if not wrote and final.suffix == ".zst":
            # this attempt wrote nothing: the log is an earlier attempt's
            return str(final), len(read_log(final))
        return str(final), self.size


def final_log(path: Path, compress: bool) -> Path | None:
    """The step's log file once an attempt ended: ``path``, the plain log this attempt
    appended to, compressed when ``compress`` (None: no log at all).

    Every attempt of a step appends to its one log. An earlier attempt that ended
    compressed its log (``<path>.zst``): this attempt's lines are added after it,
    never in its place. A step built again because its outcome could not be
    recorded (the database was down) finds its outputs valid and builds nothing: its
    log holds at most ``nix-store``'s output path (an agent's) or nothing at all,
    and alone it hid the build's log (found by tests/faults).
    """
    earlier = path.with_name(path.name + ".zst")
    if not path.exists():
        return earlier if earlier.exists() else None
    if path.stat().st_size == 0 and earlier.exists():
        path.unlink()
        return earlier
    if not (compress or earlier.exists()) or path.stat().st_size == 0:
        # nothing to compress: an empty log stays a (plain) empty file
        return path
    try:
        return compress_file(path)
    except OSError as exc:
        log.warning("cannot compress the build log %s (%s); keeping it plain", path, exc)
        return path


def compress_file(path: Path) -> Path:
    """``path`` compressed to ``<path>.zst``, after what that file holds already (an
    earlier attempt's log); ``path`` is removed."""
    target = path.with_name(path.name + ".zst")
    partial = path.with_name(path.name + ".zst.partial")
    try:
        with open(path, "rb") as source, open(partial, "wb") as sink, \
                zstandard.ZstdCompressor(level=3).stream_writer(sink, closefd=False) as writer:
            if target.exists():
                with open(target, "rb") as earlier:
                    zstandard.ZstdDecompressor().copy_stream(earlier, writer)
            shutil.copyfileobj(source, writer)
    except (OSError, zstandard.ZstdError):
        partial.unlink(missing_ok=True)
        raise
    partial.replace(target)
    path.unlink()
    return target


def read_log(path: str | Path) -> bytes:
    """A whole log, plain or zstd-compressed."""
    path = Path(path)
    data = path.read_bytes()
    if path.suffix == ".zst":
        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return data


def logged(path: Path) -> bytes:
    """What the step's log at ``path`` holds so far: an earlier attempt's compressed log,
    then the plain one being appended to (empty when there is neither)."""
    earlier = path.with_name(path.name + ".zst")
    data = read_log(earlier) if earlier.exists() else b""
    if path.exists():
        data += path.read_bytes()
    return data
