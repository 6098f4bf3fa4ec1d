"""Reading ``nix-store --export`` streams before they are imported (agent outputs)."""

from __future__ import annotations

import io
import struct
import subprocess
import tempfile
from pathlib import Path

import pytest

from circus.common.nix import nar
from circus.common.nix.environment import nix_environ
from circus.common.nix.export import (
    EXPORT_MAGIC,
    ExportFormatError,
    ExportRefused,
    read_entries,
    verify_derivation_export,
)
from tests.security.agents_support import export_of, fake_store_path


def test_reads_what_nix_store_exports(tmp_path: Path, nonce: str) -> None:
    env = nix_environ([])
    source = tmp_path / f"export-{nonce[:8]}"
    source.write_text(nonce)
    path = subprocess.run(["nix-store", "--add", str(source)], capture_output=True, text=True,
                          env=env, check=True).stdout.strip()
    stream = subprocess.run(["nix-store", "--export", path], capture_output=True, env=env,
                            check=True).stdout
    (entry,) = read_entries(io.BytesIO(stream))
    assert entry.path == path
    assert entry.references == ()


@pytest.mark.parametrize(("stream", "reason"), [
    (export_of([("/etc/passwd", b"x")]), "'/etc/passwd' is not a store path"),
    (export_of([]) + b"\0", "trailing data"),
    (struct.pack("<Q", 7), "bad export entry marker 7"),
    (export_of([(fake_store_path("a"), b"x")])[:-16], "unexpected end"),
    (struct.pack("<Q", 1) + b"\x05" + b"\0" * 7 + b"nope\0\0\0\0", "expected"),
])
def test_malformed_streams_are_refused(stream: bytes, reason: str) -> None:
    with pytest.raises(ExportFormatError, match=reason):
        read_entries(io.BytesIO(stream))


def test_lists_every_path_in_order() -> None:
    first, second = fake_store_path("one"), fake_store_path("two")
    entries = read_entries(io.BytesIO(export_of([(first, b"1"), (second, b"2")])))
    assert [e.path for e in entries] == [first, second]


def _export(entries: list[tuple[str, tuple[str, ...], str]]) -> bytes:
    """An export of ``(path, references, deriver)`` entries, each a one-byte file."""
    out = bytearray()
    with tempfile.TemporaryDirectory() as scratch:
        file = Path(scratch) / "f"
        file.write_bytes(b"x")
        archive = b"".join(nar.dump(file))
        for path, references, deriver in entries:
            out += _u64(1) + archive + _u64(EXPORT_MAGIC) + _token(path.encode())
            out += _u64(len(references)) + b"".join(_token(r.encode()) for r in references)
            out += _token(deriver.encode()) + _u64(0)
    return bytes(out + _u64(0))


def _u64(value: int) -> bytes:
    return struct.pack("<Q", value)


def _token(data: bytes) -> bytes:
    return _u64(len(data)) + data + b"\0" * (-len(data) % 8)


SOURCE = fake_store_path("data.txt")
DEP_DRV = fake_store_path("dep.drv")
TOP_DRV = fake_store_path("top.drv")
OUTPUT = fake_store_path("dep")


# an upload of drvs and the sources they name passes: tests/unit/test_store_paths.py
# (real paths: every path must also fit its content)
@pytest.mark.parametrize(("entries", "reason"), [
    # a path no .drv of the stream names
    ([(SOURCE, (), ""), (DEP_DRV, (), "")], "neither a derivation nor a source"),
    # a build's output, even one a .drv claims to reference
    ([(OUTPUT, (), DEP_DRV), (TOP_DRV, (OUTPUT,), "")], "is the output of"),
    # a source named only by another source
    ([(SOURCE, (), ""), (OUTPUT, (), ""), (TOP_DRV, (SOURCE,), "")], "neither"),
])
def test_a_derivation_upload_with_anything_else_is_refused(
        entries: list[tuple[str, tuple[str, ...], str]], reason: str) -> None:
    with pytest.raises(ExportRefused, match=reason):
        verify_derivation_export(io.BytesIO(_export(entries)), "evaluator e")
