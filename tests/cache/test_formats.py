"""NAR, base-32, narinfo and keys in Python agree with Nix byte for byte."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from circus.common.nix import base32, nar
from circus.common.nix.environment import nix_environ
from circus.common.nix.hashes import Sha256
from circus.common.nix.narinfo import NarInfo, NarInfoError
from circus.common.nix.signing import PublicKey, SecretKey, generate_key_pair
from tests.cache.support import nix_build, simple_expr
from tests.conftest import KeyPair

NIX_ENV = nix_environ([])

names = st.text(st.characters(blacklist_characters="/\0", blacklist_categories=("Cs",)),
                min_size=1, max_size=12).filter(lambda n: n not in (".", "..")
                                                and len(n.encode()) <= 200)
files = st.tuples(st.just("file"), st.binary(max_size=600), st.booleans())
symlinks = st.tuples(st.just("symlink"), st.text(
    st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)),
    min_size=1, max_size=40).filter(lambda t: len(t.encode()) < 1000))
trees = st.recursive(
    files | symlinks,
    lambda children: st.tuples(st.just("dir"), st.dictionaries(names, children, max_size=5)),
    max_leaves=12,
)


def materialise(node: tuple[Any, ...], path: Path) -> None:
    kind = node[0]
    if kind == "file":
        path.write_bytes(node[1])
        path.chmod(0o755 if node[2] else 0o644)
    elif kind == "symlink":
        os.symlink(node[1], path)
    else:
        path.mkdir()
        for name, child in node[1].items():
            materialise(child, path / name)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=trees, chunk=st.integers(min_value=8, max_value=512))
def test_nar_writer_matches_nix_store_dump(tree: tuple[Any, ...], chunk: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="circus-nar-"))
    try:
        root = work / "root"
        materialise(tree, root)
        ours = b"".join(nar.dump(root, chunk_size=chunk))
        theirs = subprocess.run(["nix-store", "--dump", str(root)], capture_output=True,
                                check=True, env=NIX_ENV).stdout
        assert ours == theirs
        nix_hash = subprocess.run(["nix", "hash", "path", "--type", "sha256", "--base32",
                                   str(root)], capture_output=True, text=True, check=True,
                                  env=NIX_ENV).stdout.strip()
        digest = nar.hash_path(root)
        assert digest.nar_hash.base32 == nix_hash
        assert digest.nar_size == len(theirs)
        # the validating reader accepts Nix's bytes and reports the same hash
        seen = bytearray()
        read = nar.read(io.BytesIO(theirs), limit=len(theirs), observe=seen.extend,
                        chunk_size=chunk)
        assert read == digest
        assert bytes(seen) == theirs
    finally:
        shutil.rmtree(work)


@settings(max_examples=25, deadline=None)
@given(tree=trees, cut=st.floats(min_value=0, max_value=1, exclude_max=True))
def test_nar_reader_rejects_truncated_or_extended_archives(tree: tuple[Any, ...],
                                                           cut: float) -> None:
    work = Path(tempfile.mkdtemp(prefix="circus-nar-"))
    try:
        materialise(tree, work / "root")
        data = b"".join(nar.dump(work / "root"))
    finally:
        shutil.rmtree(work)
    with pytest.raises(nar.NarFormatError):
        nar.read(io.BytesIO(data[:int(len(data) * cut)]))
    with pytest.raises(nar.NarFormatError):
        nar.read(io.BytesIO(data + b"\0" * 8))
    with pytest.raises(nar.NarFormatError):
        nar.read(io.BytesIO(data), limit=len(data) - 1)


def test_nar_reader_rejects_unsorted_entries_and_bad_names() -> None:
    def tok(data: bytes) -> bytes:
        return len(data).to_bytes(8, "little") + data + b"\0" * (-len(data) % 8)

    def entry(name: bytes) -> bytes:
        return (tok(b"entry") + tok(b"(") + tok(b"name") + tok(name) + tok(b"node") +
                tok(b"(") + tok(b"type") + tok(b"regular") + tok(b"contents") + tok(b"") +
                tok(b")") + tok(b")"))

    def archive(*entries: bytes) -> bytes:
        return (tok(b"nix-archive-1") + tok(b"(") + tok(b"type") + tok(b"directory") +
                b"".join(entries) + tok(b")"))

    nar.read(io.BytesIO(archive(entry(b"a"), entry(b"b"))))
    for bad in (archive(entry(b"b"), entry(b"a")), archive(entry(b"a"), entry(b"a")),
                archive(entry(b"..")), archive(entry(b"x/y")), archive(entry(b""))):
        with pytest.raises(nar.NarFormatError):
            nar.read(io.BytesIO(bad))


@settings(max_examples=200)
@given(st.binary(max_size=64))
def test_base32_round_trips(data: bytes) -> None:
    text = base32.encode(data)
    assert len(text) == base32.encoded_length(len(data))
    assert base32.decode(text) == data


def test_base32_matches_nix_and_rejects_garbage() -> None:
    digests = [Sha256.of(str(i).encode()) for i in range(20)]
    out = subprocess.run(["nix", "hash", "to-base32", "--type", "sha256",
                          *[d.digest.hex() for d in digests]], capture_output=True, text=True,
                         check=True, env=NIX_ENV).stdout.split()
    assert out == [d.base32 for d in digests]
    for bad in ("e" * 52, "0" * 51, "z" * 52, "../" + "0" * 49):
        assert not base32.is_valid(bad, 32)
        with pytest.raises(ValueError, match="base-32"):
            base32.decode(bad)
    # every notation Nix prints parses to the same hash
    digest = digests[0]
    for text in (digest.nix, digest.sri, "sha256:" + digest.digest.hex()):
        assert Sha256.parse(text) == digest


def test_keys_from_nix_sign_exactly_like_nix(cache_key: KeyPair, tmp_path: Path,
                                             nonce: str) -> None:
    secret = SecretKey.parse(cache_key.secret)
    assert str(secret.public_key()) == cache_key.public
    # and keys we generate are accepted by Nix, which signs exactly as we do
    ours_secret, ours_public = generate_key_pair("circus-generated-1")
    key_file = tmp_path / "ours.sec"
    out = nix_build(simple_expr(nonce)).outputs["out"]
    for key_text in (cache_key.secret, ours_secret):
        key_file.write_text(key_text)
        subprocess.run(["nix", "store", "sign", "--key-file", str(key_file), out], check=True,
                       capture_output=True, env=NIX_ENV)
    info = json.loads(subprocess.run(["nix", "path-info", "--json", "--sigs", out],
                                     capture_output=True, check=True, env=NIX_ENV).stdout)[0]
    narinfo = NarInfo(store_path=out, url="nar/x.nar", compression="none",
                      nar_hash=Sha256.parse(info["narHash"]).nix, nar_size=info["narSize"],
                      references=tuple(info["references"]))
    ours = {narinfo.signed(SecretKey.parse(k)).sigs[0] for k in (cache_key.secret, ours_secret)}
    assert ours == set(info["signatures"])
    signed = narinfo.signed(SecretKey.parse(ours_secret))
    assert signed.verify([PublicKey.parse(ours_public)])
    assert not signed.verify([PublicKey.parse(cache_key.public)])


def test_narinfo_parse_rejects_malformed_text() -> None:
    good = NarInfo(store_path="/nix/store/" + "a" * 32 + "-x", url="nar/a.nar",
                   compression="none", nar_hash=Sha256.of(b"").nix, nar_size=8,
                   references=("/nix/store/" + "b" * 32 + "-y",),
                   deriver="/nix/store/" + "c" * 32 + "-x.drv")
    assert NarInfo.parse(good.render()) == good
    for broken in (good.render().replace("NarSize: 8", "NarSize: -8"),
                   good.render().replace("StorePath: /nix/store/", "StorePath: /etc/"),
                   good.render().replace("References: ", "References: ../../etc "),
                   "garbage", good.render().replace("NarHash: sha256:", "NarHash: md5:")):
        with pytest.raises(NarInfoError):
            NarInfo.parse(broken)
