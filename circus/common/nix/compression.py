"""NAR compression as narinfo names it: ``zstd``, ``xz`` or ``none``."""

from __future__ import annotations

import lzma
from typing import BinaryIO, Protocol, cast

import zstandard

from circus.common.nix.nar import Readable

KINDS = ("zstd", "xz", "none")


class Compressor(Protocol):
    def compress(self, data: bytes, /) -> bytes: ...

    def flush(self) -> bytes: ...


class _Identity:
    def compress(self, data: bytes, /) -> bytes:
        return data

    def flush(self) -> bytes:
        return b""


def compressor(kind: str, level: int = 3) -> Compressor:
    if kind == "zstd":
        return cast(Compressor, zstandard.ZstdCompressor(level=level).compressobj())
    if kind == "xz":
        # xz presets are 0..9; zstd-style levels above that mean "best"
        return cast(Compressor, lzma.LZMACompressor(preset=max(0, min(level, 9))))
    if kind == "none":
        return _Identity()
    raise ValueError(f"unknown compression {kind!r}")


class DecompressionError(ValueError):
    pass


class _XzReader:
    """Concatenated xz streams; unlike ``lzma.LZMAFile``, trailing garbage is an error."""

    def __init__(self, source: Readable | BinaryIO, chunk_size: int) -> None:
        self.source = source
        self.chunk_size = chunk_size
        self.decompressor = lzma.LZMADecompressor()
        self.pending = b""  # compressed bytes not yet fed
        self.started = False

    def read(self, size: int = -1, /) -> bytes:
        want = self.chunk_size if size < 0 else size
        while True:
            if self.decompressor.eof:
                rest = self.decompressor.unused_data or self.pending or self.source.read(
                    self.chunk_size)
                self.pending = b""
                if not rest:
                    return b""
                self.decompressor = lzma.LZMADecompressor()
                self.pending = rest
            if not self.pending and self.decompressor.needs_input:
                self.pending = self.source.read(self.chunk_size)
                if not self.pending:
                    raise DecompressionError("xz stream is truncated")
            try:
                data = self.decompressor.decompress(self.pending, max_length=want)
            except lzma.LZMAError as exc:
                raise DecompressionError(f"invalid xz data: {exc}") from None
            self.pending = b""
            if data:
                return data


ZSTD_MAGIC = 0xFD2FB528
MAX_ZSTD_BLOCK = 128 * 1024


class ZstdFrameChecker:
    """Walks the framing of a zstd stream (frames, blocks, checksums) without decoding.

    python-zstandard's stream reader reports a stream cut after its last
    decoded byte as a clean end; this catches it, and any bytes after the last
    frame that are not a frame.
    """

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.need = 4
        self.skip = 0
        self.state = "magic"
        self.checksum = False
        self.last_block = False
        self.frames = 0

    def feed(self, data: bytes) -> None:
        pos, end = 0, len(data)
        while pos < end:
            if self.skip:
                step = min(self.skip, end - pos)
                self.skip -= step
                pos += step
                if not self.skip:
                    self._payload_done()
                continue
            step = min(self.need - len(self.buffer), end - pos)
            self.buffer += data[pos:pos + step]
            pos += step
            if len(self.buffer) == self.need:
                header = bytes(self.buffer)
                self.buffer.clear()
                self._header(header)

    def finish(self) -> None:
        if self.state != "magic" or self.buffer or self.skip or not self.frames:
            raise DecompressionError("zstd stream is truncated")

    def _expect(self, state: str, need: int) -> None:
        self.state, self.need = state, need

    def _header(self, header: bytes) -> None:
        state = self.state
        if state == "magic":
            magic = int.from_bytes(header, "little")
            if magic == ZSTD_MAGIC:
                self._expect("descriptor", 1)
            elif magic & 0xFFFFFFF0 == 0x184D2A50:
                self._expect("skippable", 4)
            else:
                raise DecompressionError("invalid zstd data: bad frame magic")
        elif state == "skippable":
            self.state = "skipping"
            self._skip(int.from_bytes(header, "little"))
        elif state == "descriptor":
            flags = header[0]
            if flags & 0x08:
                raise DecompressionError("invalid zstd data: reserved frame header bit set")
            single_segment = bool(flags & 0x20)
            self.checksum = bool(flags & 0x04)
            size_flag = flags >> 6
            content_size = (1 if single_segment else 0, 2, 4, 8)[size_flag]
            rest = (0 if single_segment else 1) + (0, 1, 2, 4)[flags & 0x03] + content_size
            self.frames += 1
            if rest:
                self._expect("frame-header", rest)
            else:
                self._expect("block", 3)
        elif state == "frame-header":
            self._expect("block", 3)
        elif state == "block":
            value = int.from_bytes(header, "little")
            self.last_block = bool(value & 1)
            kind = (value >> 1) & 3
            size = value >> 3
            if kind == 3 or size > MAX_ZSTD_BLOCK:
                raise DecompressionError("invalid zstd data: bad block header")
            self.state = "payload"
            self._skip(1 if kind == 1 else size)
        elif state == "checksum":
            self._expect("magic", 4)

    def _skip(self, count: int) -> None:
        self.skip = count
        if not count:
            self._payload_done()

    def _payload_done(self) -> None:
        if self.state == "skipping":
            self._expect("magic", 4)
        elif not self.last_block:
            self._expect("block", 3)
        elif self.checksum:
            self._expect("checksum", 4)
        else:
            self._expect("magic", 4)


class _Tee:
    def __init__(self, source: Readable | BinaryIO, checker: ZstdFrameChecker) -> None:
        self.source = source
        self.checker = checker

    def read(self, size: int = -1, /) -> bytes:
        data = self.source.read(size)
        self.checker.feed(data)
        return data


class _ZstdReader:
    def __init__(self, source: Readable | BinaryIO, chunk_size: int) -> None:
        self.checker = ZstdFrameChecker()
        self.tee = _Tee(source, self.checker)
        self.chunk_size = chunk_size
        self.reader = zstandard.ZstdDecompressor().stream_reader(
            cast(BinaryIO, self.tee), read_size=chunk_size, read_across_frames=True)

    def read(self, size: int = -1, /) -> bytes:
        try:
            data: bytes = self.reader.read(size)
        except zstandard.ZstdError as exc:
            raise DecompressionError(f"invalid zstd data: {exc}") from None
        if not data:
            while self.tee.read(self.chunk_size):
                pass
            self.checker.finish()
        return data


def decompressing_reader(kind: str, source: Readable | BinaryIO,
                         chunk_size: int = 256 * 1024) -> Readable:
    """A reader of the decompressed bytes of ``source`` (streamed, never whole in memory).

    Corrupt, truncated or trailing compressed data raises :class:`DecompressionError`.
    Output is produced at most ``size`` bytes per read, so a decompression bomb
    is stopped by whoever bounds the total (the NAR reader's ``limit``).
    """
    if kind == "zstd":
        return _ZstdReader(source, chunk_size)
    if kind == "xz":
        return _XzReader(source, chunk_size)
    if kind == "none":
        return source
    raise ValueError(f"unknown compression {kind!r}")
