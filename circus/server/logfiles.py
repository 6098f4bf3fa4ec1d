"""Reading build logs: whole (decompressing zstd) and followed while a step runs.

Writers (the queue runner) keep a running step's log as a plain file under
``logs.log_dir`` and compress it with zstd once the step finishes, updating
``steps.log_path``. Readers therefore decide by content (zstd magic), never by
name, and re-read ``log_path`` when a followed step finishes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import zstandard

from circus.queue_runner.steps.logs import log_path_for

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
CHUNK = 64 * 1024


def resolve(log_dir: str, log_path: str | None) -> Path | None:
    """The log file of a step; relative paths are inside ``log_dir``. None if missing."""
    if not log_path:
        return None
    path = Path(log_path)
    if not path.is_absolute():
        path = Path(log_dir) / path
    return path if path.is_file() else None


def running_log(log_dir: str, drv_path: str, step_id: int) -> Path | None:
    """The plain log a running step is writing, before ``steps.log_path`` names it
    (the queue runner records ``log_path`` when the step finishes)."""
    if not drv_path or "\x00" in drv_path:
        return None
    path = log_path_for(log_dir, drv_path, step_id)
    return path if path.is_file() else None


def step_log(log_dir: str, log_path: str | None, drv_path: str, step_id: int) -> Path | None:
    """A step's log file: the recorded one, else the one it is writing right now."""
    return resolve(log_dir, log_path) or running_log(log_dir, drv_path, step_id)


def is_compressed(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.read(4) == ZSTD_MAGIC


def read_chunks(path: Path) -> Iterator[bytes]:
    """The whole log, decompressed, in chunks (never all in memory)."""
    with path.open("rb") as raw:
        if raw.read(4) == ZSTD_MAGIC:
            raw.seek(0)
            reader: BinaryIO = zstandard.ZstdDecompressor().stream_reader(raw)
        else:
            raw.seek(0)
            reader = raw
        while chunk := reader.read(CHUNK):
            yield chunk

#: seconds of silence after which :func:`follow` yields an empty keep-alive chunk
IDLE_HEARTBEAT = 15.0


def follow(locate: Callable[[], tuple[Path | None, bool]], *, poll: float = 0.25,
           timeout: float = 3600.0, start: int = 0) -> Iterator[bytes]:
    """Yield a growing plain log as it grows, until the step is done.

    ``locate()`` returns ``(current log file, step finished)``. When the step
    finishes, the rest of its final log (which may now be compressed) is
    yielded from the offset already sent. ``start`` skips bytes the reader
    already has (offsets are of the uncompressed log). After ``IDLE_HEARTBEAT``
    seconds without output an empty chunk is yielded, so a stream over a quiet build can
    send a keep-alive before proxies and clients give up on it.
    """
    sent = max(0, start)
    now = time.monotonic()
    deadline = now + timeout
    last_yield = now
    while (now := time.monotonic()) < deadline:
        path, finished = locate()
        if path is not None and not is_compressed(path):
            size = os.path.getsize(path)
            if size > sent:
                with path.open("rb") as handle:
                    handle.seek(sent)
                    while sent < size and (chunk := handle.read(min(CHUNK, size - sent))):
                        sent += len(chunk)
                        last_yield = now
                        yield chunk
        if not finished and now - last_yield >= IDLE_HEARTBEAT:
            last_yield = now
            yield b""
        if finished:
            if path is not None and is_compressed(path):
                yield from _skip(read_chunks(path), sent)
            return
        time.sleep(poll)


def _skip(chunks: Iterator[bytes], offset: int) -> Iterator[bytes]:
    for chunk in chunks:
        if offset >= len(chunk):
            offset -= len(chunk)
            continue
        yield chunk[offset:]
        offset = 0


def tail(path: Path, limit: int) -> tuple[bytes, int]:
    """The last ``limit`` bytes of a log (decompressed) and the log's whole length.

    A plain (running) log is read from its end; a compressed one is streamed
    through, keeping only the last ``limit`` bytes in memory.
    """
    if not is_compressed(path):
        size = os.path.getsize(path)
        begin = max(0, size - limit)
        with path.open("rb") as handle:
            handle.seek(begin)
            data = handle.read(size - begin)
        return data, begin + len(data)
    kept = bytearray()
    total = 0
    for chunk in read_chunks(path):
        total += len(chunk)
        kept += chunk
        if len(kept) > 2 * limit:
            del kept[:-limit]
    return bytes(kept[-limit:]), total


def tail_text(path: Path, limit: int) -> tuple[str, int, bool]:
    """The end of a log as text: (text, the log's whole length, whether it was cut).

    A cut tail starts at its first whole line, so readers never see half a line.
    """
    data, length = tail(path, limit)
    truncated = length > len(data)
    if truncated and b"\n" in data:
        data = data[data.index(b"\n") + 1:]
    return data.decode(errors="replace"), length, truncated
