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


def decompressing_reader(kind: str, source: Readable | BinaryIO) -> Readable:
    """A reader of the decompressed bytes of ``source`` (streamed, never whole in memory)."""
    if kind == "zstd":
        return cast(Readable, zstandard.ZstdDecompressor().stream_reader(
            cast(BinaryIO, source), read_across_frames=True))
    if kind == "xz":
        return cast(Readable, lzma.LZMAFile(cast(BinaryIO, source), "rb"))
    if kind == "none":
        return source
    raise ValueError(f"unknown compression {kind!r}")
