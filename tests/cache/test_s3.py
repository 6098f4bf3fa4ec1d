"""S3 against a real SeaweedFS: uploads, presigned GET redirects, presigned PUT uploads."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
import requests
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from circus.cache.presign import (
    UploadRejected,
    UploadReport,
    UploadRequest,
    mint,
    verify_and_record,
)
from circus.cache.publish import UploadError, publish_outputs
from circus.cache.s3 import S3Store
from circus.common.config import Settings
from circus.common.models import NarInfo as NarInfoRow
from circus.common.nix import nar
from circus.common.nix.compression import compressor
from circus.common.nix.hashes import Sha256
from circus.common.nix.narinfo import NarInfo
from circus.common.nix.signing import PublicKey
from tests.cache.support import (
    Built,
    closure_expr,
    make_build,
    nix_build,
    nix_copy,
    serve,
    simple_expr,
    store_has,
)
from tests.conftest import KeyPair, S3Server
from tests.helpers.net import free_port


@pytest.fixture
def s3_settings(cache_settings: Callable[..., Settings], s3_server: S3Server, nonce: str
                ) -> Callable[..., Settings]:
    def make(**upload: object) -> Settings:
        return cache_settings(cache_upload=s3_server.upload_settings(f"cache-{nonce}", **upload))

    return make


def test_publish_uploads_and_nix_follows_presigned_redirects(
        committed_db: sessionmaker[Session], s3_settings: Callable[..., Settings],
        cache_key: KeyPair, other_key: KeyPair, tmp_path: Path, nonce: str) -> None:
    settings = s3_settings()
    built = nix_build(closure_expr(nonce, blob_kib=200))
    with committed_db.begin() as session:
        result = publish_outputs(session, settings, make_build(session, built).id)
    assert result.signed is True
    assert len(result.added) == 3
    store = S3Store(settings.cache_upload)
    with committed_db() as session:
        rows = list(session.scalars(select(NarInfoRow)))
    assert {r.storage for r in rows} == {"s3"}
    # the bucket is a complete binary cache: narinfo + NAR per path, nix-cache-info
    assert store.exists("nix-cache-info")
    public = PublicKey.parse(cache_key.public)
    for row in rows:
        assert store.exists(row.url)
        body = store.open(f"{row.hash_part}.narinfo")
        assert NarInfo.parse(body.read().decode()).verify([public])
        # the local copy is gone once S3 has it
        assert not Path(settings.cache.cache_dir, row.url).exists()

    out = built.outputs["out"]
    with serve(settings) as base:
        row = next(r for r in rows if r.store_path == out)
        moved = requests.get(f"{base}/nix-cache/{row.url}", allow_redirects=False, timeout=10)
        assert moved.status_code == 302
        assert moved.headers["Location"].startswith(settings.cache_upload.s3.endpoint_url or "")
        assert "X-Amz-Signature" in moved.headers["Location"]
        fetched = requests.get(moved.headers["Location"], timeout=10)
        assert fetched.status_code == 200
        assert Sha256.of(fetched.content).nix == row.file_hash

        good = nix_copy(f"{base}/nix-cache", [out], cache_key.public, tmp_path / "good")
        assert good.returncode == 0, good.stderr
        dep = Path(out, "dep-path").read_text().strip()
        assert store_has(tmp_path / "good", dep)
        assert (tmp_path / "good" / dep.lstrip("/") / "share/blob").read_bytes() == \
            Path(dep, "share/blob").read_bytes()
        bad = nix_copy(f"{base}/nix-cache", [out], other_key.public, tmp_path / "bad")
        assert bad.returncode != 0
        assert not store_has(tmp_path / "bad", out)


def test_seaweedfs_refuses_expired_and_tampered_presigned_urls(
        s3_settings: Callable[..., Settings]) -> None:
    store = S3Store(s3_settings().cache_upload)
    store.put_bytes("nar/probe", b"probe bytes", "application/octet-stream")
    store.put_bytes("nar/other", b"other bytes", "application/octet-stream")
    url = store.presigned_get("nar/probe", expires=2)
    assert requests.get(url, timeout=10).content == b"probe bytes"
    signature = url.rsplit("X-Amz-Signature=", 1)[1]
    flipped = signature[:-1] + ("0" if signature[-1] != "0" else "1")
    for tampered in (url.replace("nar/probe", "nar/other"),
                     url.replace(signature, flipped),
                     url.replace("X-Amz-Expires=2", "X-Amz-Expires=3600")):
        assert requests.get(tampered, timeout=10).status_code == 403
    put = store.presigned_put("uploads/probe", expires=60)
    assert requests.put(put.replace("uploads/probe", "uploads/elsewhere"), data=b"x",
                        timeout=10).status_code == 403
    assert not store.exists("uploads/elsewhere")
    time.sleep(3)
    expired = requests.get(url, timeout=10)
    assert expired.status_code == 403
    assert b"probe bytes" not in expired.content


def agent_upload(built: Built, name: str, minted_url: str, compression: str,
                 payload: bytes | None = None) -> tuple[bytes, nar.NarDigest]:
    """What an agent does: dump, compress, PUT to the presigned URL."""
    path = built.outputs[name]
    digest = nar.hash_path(path)
    squeeze = compressor(compression)
    data = payload if payload is not None else \
        b"".join(squeeze.compress(c) for c in nar.dump(path)) + squeeze.flush()
    response = requests.put(minted_url, data=data, timeout=30)
    assert response.status_code == 200, response.text
    return data, digest


def test_presigned_upload_is_verified_signed_recorded_and_served(
        committed_db: sessionmaker[Session], s3_settings: Callable[..., Settings],
        cache_key: KeyPair, tmp_path: Path, nonce: str) -> None:
    settings = s3_settings()
    built = nix_build(simple_expr(nonce, body="agent-built"))
    out = built.outputs["out"]
    digest = nar.hash_path(out)
    with committed_db.begin() as session:
        build = make_build(session, built)
        build_id = build.id
        (minted,) = mint(session, settings, build_id, [
            UploadRequest(out, digest.nar_hash.sri, digest.nar_size)], session_id="agent-1")
    assert minted.error is None
    assert minted.compression == "zstd"
    data, _ = agent_upload(built, "out", minted.nar_url, minted.compression)
    report = UploadReport(out, digest.nar_hash.nix, digest.nar_size, "zstd", minted.nar_path,
                          file_hash=Sha256.of(data).nix, file_size=len(data))
    with committed_db.begin() as session:
        narinfo = verify_and_record(session, settings, build_id, report, session_id="agent-1")
    assert narinfo.verify([PublicKey.parse(cache_key.public)])
    store = S3Store(settings.cache_upload)
    assert not store.exists(minted.nar_path)
    assert store.exists(narinfo.url)
    with committed_db() as session:
        row = session.get(NarInfoRow, out)
        assert row is not None
        assert row.storage == "s3"
        assert row.build_id == build_id
        # a second mint for a recorded path asks for no upload
        (again,) = mint(session, settings, build_id, [
            UploadRequest(out, digest.nar_hash.nix, digest.nar_size)], session_id="agent-1")
        assert again.already_cached
        assert again.nar_url == ""
    with serve(settings) as base:
        copied = nix_copy(f"{base}/nix-cache", [out], cache_key.public, tmp_path / "store")
    assert copied.returncode == 0, copied.stderr
    assert (tmp_path / "store" / out.lstrip("/")).read_text() == Path(out).read_text()


TAMPERING = ["wrong-bytes", "truncated", "wrong-compression", "trailing-garbage",
             "wrong-file-hash", "wrong-file-size", "fake-reference", "other-session",
             "other-path", "nothing-uploaded"]


@pytest.mark.parametrize("case", TAMPERING)
def test_tampered_uploads_are_rejected_and_nothing_recorded(
        case: str, db: Session, s3_settings: Callable[..., Settings], nonce: str) -> None:
    settings = s3_settings()
    built = nix_build(closure_expr(nonce, blob_kib=1))
    build = make_build(db, built)
    out, doc = built.outputs["out"], built.outputs["doc"]
    digest = nar.hash_path(out)
    (minted,) = mint(db, settings, build.id, [
        UploadRequest(out, digest.nar_hash.nix, digest.nar_size)], session_id="agent-1")
    real = b"".join(nar.dump(out))
    dep = Path(out, "dep-path").read_text().strip()
    squeeze = compressor("zstd")
    good = squeeze.compress(real) + squeeze.flush()
    payload = {
        "wrong-bytes": _zstd(b"".join(nar.dump(doc))),
        "truncated": good[:-6],
        "wrong-compression": _xz(real),
        "trailing-garbage": good + b"garbage after the frame",
    }.get(case, good)
    if case != "nothing-uploaded":
        agent_upload(built, "out", minted.nar_url, "zstd", payload)
    report = UploadReport(
        out, digest.nar_hash.nix, digest.nar_size, "zstd", minted.nar_path,
        file_hash=Sha256.of(b"x").nix if case == "wrong-file-hash" else Sha256.of(payload).nix,
        file_size=len(payload) + (1 if case == "wrong-file-size" else 0),
        references=(dep, "/nix/store/" + "1" * 32 + "-not-referenced")
        if case == "fake-reference" else (dep,))
    if case == "other-path":
        report = UploadReport(doc, digest.nar_hash.nix, digest.nar_size, "zstd",
                              minted.nar_path)
    with pytest.raises(UploadRejected):
        verify_and_record(db, settings, build.id, report,
                          session_id="agent-2" if case == "other-session" else "agent-1")
    assert db.scalars(select(NarInfoRow)).all() == []
    store = S3Store(settings.cache_upload)
    if case not in ("other-session", "other-path", "nothing-uploaded"):
        # a rejected upload is deleted; an unbound report never touches the object
        assert not store.exists(minted.nar_path)
    # the honest upload to the same URL is still accepted afterwards (while not expired)
    if case in ("other-session", "wrong-file-size"):
        agent_upload(built, "out", minted.nar_url, "zstd", good)
        honest = UploadReport(out, digest.nar_hash.nix, digest.nar_size, "zstd",
                              minted.nar_path, references=(dep,))
        assert verify_and_record(db, settings, build.id, honest, session_id="agent-1")
        assert db.get(NarInfoRow, out) is not None


def _zstd(data: bytes) -> bytes:
    squeeze = compressor("zstd")
    return squeeze.compress(data) + squeeze.flush()


def _xz(data: bytes) -> bytes:
    squeeze = compressor("xz")
    return squeeze.compress(data) + squeeze.flush()


def test_mint_refuses_what_is_not_an_output(
        db: Session, s3_settings: Callable[..., Settings], nonce: str) -> None:
    settings = s3_settings()
    built = nix_build(simple_expr(nonce))
    build = make_build(db, built)
    other = "/nix/store/" + "2" * 32 + "-elsewhere"
    answers = mint(db, settings, build.id, [
        UploadRequest(other, Sha256.of(b"").nix, 10),
        UploadRequest("/etc/passwd", Sha256.of(b"").nix, 10),
        UploadRequest(built.outputs["out"], "md5:00", 10),
        UploadRequest(built.outputs["out"], Sha256.of(b"").nix, 0),
    ])
    assert [a.nar_url for a in answers] == ["", "", "", ""]
    assert all(a.error for a in answers)
    from circus.common.errors import InvalidInput
    with pytest.raises(InvalidInput):
        mint(db, settings, build.id, [UploadRequest(other, Sha256.of(b"").nix, 1)] * 129)


def test_upload_failures(committed_db: sessionmaker[Session],
                         cache_settings: Callable[..., Settings], s3_server: S3Server,
                         nonce: str) -> None:
    dead = s3_server.upload_settings(f"dead-{nonce}", retries=0,
                                     fail_build_on_upload_error=True)
    dead["s3"] = {**dead["s3"], "endpoint_url": f"http://127.0.0.1:{free_port()}"}
    built = nix_build(simple_expr(nonce))
    with committed_db.begin() as session:
        build_id = make_build(session, built).id
    with committed_db.begin() as session, pytest.raises(UploadError):
        publish_outputs(session, cache_settings(cache_upload=dead), build_id)
    with committed_db() as session:
        assert session.scalars(select(NarInfoRow)).all() == []

    # without fail_build_on_upload_error the path is served from local disk...
    tolerant = {**dead, "fail_build_on_upload_error": False}
    with committed_db.begin() as session:
        result = publish_outputs(session, cache_settings(cache_upload=tolerant), build_id)
    assert result.published == [built.outputs["out"]]
    with committed_db() as session:
        (row,) = session.scalars(select(NarInfoRow)).all()
        assert row.storage == "local"
    # ...and the next publish with S3 reachable uploads it
    alive = s3_server.upload_settings(f"dead-{nonce}")
    settings = cache_settings(cache_upload=alive)
    with committed_db.begin() as session:
        publish_outputs(session, settings, build_id)
    with committed_db() as session:
        (row,) = session.scalars(select(NarInfoRow)).all()
        assert row.storage == "s3"
    assert S3Store(settings.cache_upload).exists(row.url)
