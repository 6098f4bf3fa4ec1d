"""The in-process narinfo LRU and the strict decompressors."""

from __future__ import annotations

import io
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from circus.common.nix.compression import DecompressionError, compressor, decompressing_reader
from circus.server.cache.fastpath import _parse
from circus.server.cache.lookup import ABSENT, TtlLru


def test_lru_evicts_least_recently_used_and_expires() -> None:
    lru: TtlLru[str] = TtlLru(2)
    lru.put("a", "A", 60)
    lru.put("b", "B", 60)
    assert lru.get("a") == "A"  # a is now the most recent
    lru.put("c", "C", 60)
    assert lru.get("b") is ABSENT
    assert (lru.get("a"), lru.get("c")) == ("A", "C")
    lru.put("short", "S", 0.05)
    time.sleep(0.1)
    assert lru.get("short") is ABSENT
    assert len(lru) <= 2


def test_fast_path_only_takes_well_formed_narinfo_urls() -> None:
    good = "a" * 32
    assert _parse(f"/nix-cache/{good}.narinfo") == (None, good)
    assert _parse(f"/projects/demo/nix-cache/{good}.narinfo") == ("demo", good)
    for bad in (f"/nix-cache/{'e' * 32}.narinfo", f"/nix-cache/../{good}.narinfo",
                f"/projects/a/b/nix-cache/{good}.narinfo", f"/nix-cache/nar/{good}.narinfo",
                f"/other/{good}.narinfo", f"/nix-cache/{good}.nar"):
        assert _parse(bad) is None, bad


def _compress(kind: str, data: bytes) -> bytes:
    squeeze = compressor(kind)
    return squeeze.compress(data) + squeeze.flush()


def _drain(kind: str, data: bytes) -> bytes:
    reader = decompressing_reader(kind, io.BytesIO(data), chunk_size=512)
    out = bytearray()
    while chunk := reader.read(300):
        assert len(chunk) <= 300
        out += chunk
    return bytes(out)


@settings(max_examples=60, deadline=None)
@given(kind=st.sampled_from(["zstd", "xz"]), data=st.binary(min_size=1, max_size=5000),
       cut=st.integers(min_value=1, max_value=40), garbage=st.binary(min_size=1, max_size=16))
def test_decompression_is_strict(kind: str, data: bytes, cut: int, garbage: bytes) -> None:
    packed = _compress(kind, data)
    assert _drain(kind, packed) == data
    assert _drain(kind, packed + _compress(kind, b"tail")) == data + b"tail"
    with pytest.raises(DecompressionError):
        _drain(kind, packed[:-min(cut, len(packed))])
    with pytest.raises(DecompressionError):
        _drain(kind, packed + garbage)
