"""The Nix ARchive format: a streaming writer and a streaming validating reader.

The writer produces the same bytes as ``nix-store --dump`` without ever holding
a file whole in memory: small framing tokens are gathered in a buffer and file
contents pass through in chunks. The reader checks that a byte stream is a
well-formed NAR while hashing it, so an upload can be verified as it is
decompressed. Neither imports anything outside the standard library.
"""

from __future__ import annotations

import hashlib
import os
import stat
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO, Protocol

from circus.common.nix.hashes import Sha256

MAGIC = b"nix-archive-1"
CHUNK_SIZE = 256 * 1024
#: Nix refuses names and symlink targets longer than this; so do we
MAX_TOKEN = 4096


class NarFormatError(ValueError):
    pass


def _token(data: bytes) -> bytes:
    pad = -len(data) % 8
    return struct.pack("<Q", len(data)) + data + b"\0" * pad


_OPEN = _token(b"(")
_CLOSE = _token(b")")
_HEAD = _token(MAGIC)
_TYPE = _token(b"type")
_REGULAR = _token(b"regular")
_EXECUTABLE = _token(b"executable") + _token(b"")
_CONTENTS = _token(b"contents")
_SYMLINK = _token(b"symlink")
_TARGET = _token(b"target")
_DIRECTORY = _token(b"directory")
_ENTRY = _token(b"entry")
_NAME = _token(b"name")
_NODE = _token(b"node")


def dump(path: str | os.PathLike[str], chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
    """Yield the NAR serialisation of ``path`` (a file, symlink or directory tree)."""
    buffer = bytearray(_HEAD)
    yield from _dump_node(os.fsencode(path), buffer, chunk_size)
    if buffer:
        yield bytes(buffer)


def _dump_node(path: bytes, buffer: bytearray, chunk_size: int) -> Iterator[bytes]:
    info = os.lstat(path)
    buffer += _OPEN + _TYPE
    if stat.S_ISREG(info.st_mode):
        buffer += _REGULAR
        if info.st_mode & stat.S_IXUSR:
            buffer += _EXECUTABLE
        buffer += _CONTENTS + struct.pack("<Q", info.st_size)
        yield from _dump_contents(path, info.st_size, buffer, chunk_size)
    elif stat.S_ISLNK(info.st_mode):
        buffer += _SYMLINK + _TARGET + _token(os.readlink(path))
    elif stat.S_ISDIR(info.st_mode):
        buffer += _DIRECTORY
        # Nix orders entries by their raw byte names
        for name in sorted(os.listdir(path)):
            buffer += _ENTRY + _OPEN + _NAME + _token(name) + _NODE
            yield from _dump_node(path + b"/" + name, buffer, chunk_size)
            buffer += _CLOSE
    else:
        raise NarFormatError(f"cannot archive {os.fsdecode(path)!r}: unsupported file type")
    buffer += _CLOSE
    if len(buffer) >= chunk_size:
        yield bytes(buffer)
        buffer.clear()


def _dump_contents(path: bytes, size: int, buffer: bytearray,
                   chunk_size: int) -> Iterator[bytes]:
    remaining = size
    with open(path, "rb", buffering=0) as handle:
        while remaining:
            if remaining >= chunk_size:
                # large contents pass straight through, without a copy into the buffer
                if buffer:
                    yield bytes(buffer)
                    buffer.clear()
                data = handle.read(chunk_size)
                if data:
                    yield data
            else:
                data = handle.read(remaining)
                buffer += data
            if not data:
                raise NarFormatError(f"{os.fsdecode(path)!r} shrank while being archived")
            remaining -= len(data)
        if handle.read(1):
            raise NarFormatError(f"{os.fsdecode(path)!r} grew while being archived")
    buffer += b"\0" * (-size % 8)


@dataclass(frozen=True)
class NarDigest:
    nar_hash: Sha256
    nar_size: int


def hash_chunks(chunks: Iterable[bytes]) -> NarDigest:
    digest = hashlib.sha256()
    size = 0
    for chunk in chunks:
        digest.update(chunk)
        size += len(chunk)
    return NarDigest(Sha256(digest.digest()), size)


def hash_path(path: str | os.PathLike[str]) -> NarDigest:
    """What ``nix hash path`` and ``narHash``/``narSize`` of ``nix path-info`` report."""
    return hash_chunks(dump(path))


# ---------------------------------------------------------------------------
# reading


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class Reader:
    """Reads exactly what is asked, hashing and counting every byte."""

    def __init__(self, source: Readable | BinaryIO, limit: int | None,
                 observe: Callable[[bytes], None] | None) -> None:
        self.source = source
        self.limit = limit
        self.observe = observe
        self.digest = hashlib.sha256()
        self.size = 0

    def read(self, size: int) -> bytes:
        if self.limit is not None and self.size + size > self.limit:
            raise NarFormatError(f"NAR is larger than the expected {self.limit} bytes")
        parts = []
        remaining = size
        while remaining:
            data = self.source.read(remaining)
            if not data:
                raise NarFormatError("unexpected end of NAR")
            parts.append(data)
            remaining -= len(data)
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        self.digest.update(data)
        self.size += size
        if self.observe is not None:
            self.observe(data)
        return data

    def u64(self) -> int:
        value: int = struct.unpack("<Q", self.read(8))[0]
        return value

    def token(self, limit: int = MAX_TOKEN) -> bytes:
        length = self.u64()
        if length > limit:
            raise NarFormatError(f"NAR token of {length} bytes exceeds the limit")
        data = self.read(length)
        self._padding(length)
        return data

    def expect(self, wanted: bytes) -> None:
        got = self.token()
        if got != wanted:
            raise NarFormatError(f"expected {wanted!r} in NAR, got {got[:64]!r}")

    def _padding(self, length: int) -> None:
        pad = -length % 8
        if pad and self.read(pad) != b"\0" * pad:
            raise NarFormatError("non-zero NAR padding")

    def skip_contents(self, chunk_size: int,
                      sink: Callable[[bytes], None] | None = None) -> None:
        """Read a file's contents, handing them to ``sink`` (if any) chunk by chunk."""
        remaining = self.u64()
        total = remaining
        while remaining:
            step = min(remaining, chunk_size)
            data = self.read(step)
            if sink is not None:
                sink(data)
            remaining -= step
        self._padding(total)


def read(source: Readable | BinaryIO, *, limit: int | None = None,
         observe: Callable[[bytes], None] | None = None,
         chunk_size: int = CHUNK_SIZE) -> NarDigest:
    """Validate a NAR read from ``source`` and return its hash and size.

    ``limit`` bounds the bytes read (a decompression bomb stops early);
    ``observe`` sees every byte (used to scan for references). Data after the
    archive's end is an error.
    """
    reader = Reader(source, limit, observe)
    read_archive(reader, chunk_size)
    if source.read(1):
        raise NarFormatError("trailing data after the NAR")
    return NarDigest(Sha256(reader.digest.digest()), reader.size)


#: the kinds of a NAR's top node, as :func:`read_archive` names them
REGULAR, EXECUTABLE, SYMLINK, DIRECTORY = "regular", "executable", "symlink", "directory"


def read_archive(reader: Reader, chunk_size: int = CHUNK_SIZE,
                 file_sink: Callable[[bytes], None] | None = None) -> str:
    """Validate one NAR from ``reader``, stopping right after it (a stream may go on).

    Returns the kind of its top node (:data:`REGULAR`, :data:`EXECUTABLE`,
    :data:`SYMLINK` or :data:`DIRECTORY`); when that is a file, ``file_sink`` (if any)
    receives its contents (to hash them as Nix hashes a text or flat path).
    """
    reader.expect(MAGIC)
    return _read_node(reader, chunk_size, depth=0, file_sink=file_sink)


def _read_node(reader: Reader, chunk_size: int, depth: int,
               file_sink: Callable[[bytes], None] | None = None) -> str:
    if depth > 256:
        raise NarFormatError("NAR nesting too deep")
    reader.expect(b"(")
    reader.expect(b"type")
    kind = reader.token()
    if kind == b"regular":
        found = REGULAR
        tag = reader.token()
        if tag == b"executable":
            reader.expect(b"")
            tag = reader.token()
            found = EXECUTABLE
        if tag != b"contents":
            raise NarFormatError(f"expected 'contents' in NAR, got {tag[:64]!r}")
        reader.skip_contents(chunk_size, file_sink)
        reader.expect(b")")
        return found
    if kind == b"symlink":
        reader.expect(b"target")
        if not reader.token():
            raise NarFormatError("empty symlink target in NAR")
        reader.expect(b")")
        return SYMLINK
    if kind == b"directory":
        previous: bytes | None = None
        while True:
            tag = reader.token()
            if tag == b")":
                break
            if tag != b"entry":
                raise NarFormatError(f"expected 'entry' in NAR, got {tag[:64]!r}")
            reader.expect(b"(")
            reader.expect(b"name")
            name = reader.token()
            if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
                raise NarFormatError(f"invalid file name {name[:64]!r} in NAR")
            if previous is not None and name <= previous:
                raise NarFormatError("NAR directory entries are not sorted")
            previous = name
            reader.expect(b"node")
            _read_node(reader, chunk_size, depth + 1)
            reader.expect(b")")
        return DIRECTORY
    raise NarFormatError(f"unknown NAR node type {kind[:64]!r}")
