"""Reading ``nix-store --export`` streams before they are imported (agent outputs)."""

from __future__ import annotations

import io
import struct
import subprocess
from pathlib import Path

import pytest

from circus.common.nix.environment import nix_environ
from circus.common.nix.export import ExportFormatError, read_entries
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
