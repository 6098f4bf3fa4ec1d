"""publish_outputs: NARs packed, hashed, signed and recorded, idempotently."""

from __future__ import annotations

import lzma
import subprocess
from collections.abc import Callable
from pathlib import Path

import zstandard
from sqlalchemy import select
from sqlalchemy.orm import Session

from circus.cache.publish import publish_builds, publish_outputs
from circus.cache.records import from_row
from circus.common.config import Settings
from circus.common.models import Build, NarInfo, NarInfoProject
from circus.common.nix import nar
from circus.common.nix.environment import nix_environ
from circus.common.nix.hashes import Sha256
from circus.common.nix.signing import PublicKey
from tests.cache.support import closure_expr, make_build, nix_build, simple_expr
from tests.conftest import KeyPair


def rows(db: Session) -> dict[str, NarInfo]:
    return {r.store_path: r for r in db.scalars(select(NarInfo))}


def test_publish_records_the_closure_signed_and_compressed(
        db: Session, cache_settings: Callable[..., Settings], cache_key: KeyPair,
        nonce: str) -> None:
    settings = cache_settings()
    built = nix_build(closure_expr(nonce))
    build = make_build(db, built)
    result = publish_outputs(db, settings, build.id)

    out, doc = built.outputs["out"], built.outputs["doc"]
    dep = Path(out, "dep-path").read_text().strip()
    assert sorted(result.published) == sorted([out, doc, dep])
    assert sorted(result.added) == sorted([out, doc, dep])
    assert result.signed is True
    assert result.errors == {}
    assert db.get(Build, build.id).signed is True  # type: ignore[union-attr]

    recorded = rows(db)
    assert set(recorded) == {out, doc, dep}
    assert recorded[out].references == [dep]
    public = PublicKey.parse(cache_key.public)
    for path, row in recorded.items():
        info = from_row(row.__dict__)
        assert info.verify([public]), path
        assert row.compression.value == "zstd"
        assert row.storage == "local"
        assert row.build_id == build.id
        # the NAR file decompresses to exactly what nix-store --dump produces
        file = Path(settings.cache.cache_dir, row.url)
        data = file.read_bytes()
        assert Sha256.of(data).nix == row.file_hash
        assert len(data) == row.file_size
        dumped = subprocess.run(["nix-store", "--dump", path], capture_output=True, check=True,
                                env=nix_environ([])).stdout
        assert zstandard.ZstdDecompressor().decompressobj().decompress(data) == dumped
        assert Sha256.of(dumped).nix == row.nar_hash
        assert len(dumped) == row.nar_size
    links = set(db.execute(select(NarInfoProject.store_path, NarInfoProject.project_id)))
    assert links == {(p, build.project_id) for p in (out, doc, dep)}


def test_publish_is_idempotent_and_shares_recorded_paths(
        db: Session, cache_settings: Callable[..., Settings], nonce: str) -> None:
    settings = cache_settings(cache={"compression": "xz"})
    built = nix_build(closure_expr(nonce, blob_kib=1))
    first = make_build(db, built, project="first")
    publish_outputs(db, settings, first.id)
    before = {p: (r.url, r.sig, r.file_hash) for p, r in rows(db).items()}
    files = sorted(Path(settings.cache.cache_dir, "nar").iterdir())

    again = publish_outputs(db, settings, first.id)
    assert again.added == []
    assert sorted(again.published) == sorted(before)
    # a second project building the same outputs reuses the rows and gains access to them
    second = make_build(db, built, project="second")
    shared = publish_outputs(db, settings, second.id)
    assert shared.added == []
    assert shared.signed is True
    assert {p: (r.url, r.sig, r.file_hash) for p, r in rows(db).items()} == before
    assert sorted(Path(settings.cache.cache_dir, "nar").iterdir()) == files
    assert all(r.compression.value == "xz" for r in rows(db).values())
    for row in rows(db).values():
        lzma.decompress(Path(settings.cache.cache_dir, row.url).read_bytes())
    projects = {pid for (pid,) in db.execute(select(NarInfoProject.project_id).distinct())}
    assert projects == {first.project_id, second.project_id}


def test_unsigned_rows_are_signed_once_signing_is_enabled(
        db: Session, make_settings: Callable[..., Settings],
        cache_settings: Callable[..., Settings], cache_key: KeyPair, nonce: str) -> None:
    built = nix_build(simple_expr(nonce))
    build = make_build(db, built)
    unsigned = publish_outputs(db, make_settings(cache={"compression": "none"}), build.id)
    assert unsigned.signed is False
    (row,) = rows(db).values()
    assert row.sig is None
    assert row.file_hash == row.nar_hash
    assert db.get(Build, build.id).signed is False  # type: ignore[union-attr]

    signed = publish_outputs(db, cache_settings(), build.id)
    assert signed.signed is True
    assert signed.added == []
    db.expire_all()
    (row,) = rows(db).values()
    assert from_row(row.__dict__).verify([PublicKey.parse(cache_key.public)])


def test_disabled_project_caches_and_missing_outputs(
        db: Session, cache_settings: Callable[..., Settings], nonce: str) -> None:
    settings = cache_settings()
    built = nix_build(simple_expr(nonce))
    hidden = make_build(db, built, project="nocache", cache_enabled=False)
    assert publish_outputs(db, settings, hidden.id).published == []
    assert rows(db) == {}

    # an output that is not (or no longer) in the store is reported, never recorded
    ghost = nix_build(simple_expr(nonce, body="other"))
    fake = "/nix/store/" + "0" * 32 + f"-circus-cache-gone-{nonce}"
    ghost = type(ghost)(ghost.drv_path, {"out": ghost.outputs["out"], "extra": fake})
    build = make_build(db, ghost)
    result = publish_outputs(db, settings, build.id)
    assert result.published == [ghost.outputs["out"]]
    assert fake in result.errors
    assert result.signed is False
    assert set(rows(db)) == {ghost.outputs["out"]}


def test_nar_hash_of_published_paths_matches_the_python_writer(
        db: Session, cache_settings: Callable[..., Settings], nonce: str) -> None:
    built = nix_build(closure_expr(nonce, blob_kib=700))
    build = make_build(db, built)
    publish_outputs(db, cache_settings(), build.id)
    for path, row in rows(db).items():
        digest = nar.hash_path(path)
        assert (digest.nar_hash.nix, digest.nar_size) == (row.nar_hash, row.nar_size)


def test_many_builds_publish_together_with_shared_closures(
        db: Session, cache_settings: Callable[..., Settings], nonce: str) -> None:
    """What the queue runner's post-processor does after a batch of builds finished."""
    settings = cache_settings()
    shared = nix_build(closure_expr(nonce, blob_kib=1))
    other = nix_build(simple_expr(nonce, "other"))
    first = make_build(db, shared, project="alpha", job="a")
    second = make_build(db, shared, project="beta", job="b")
    third = make_build(db, other, project="alpha", job="c")
    results = publish_builds(db, settings, [third.id, first.id, second.id])
    recorded = rows(db)
    shared_closure = set(results[first.id].published)
    assert set(results[second.id].published) == shared_closure
    assert results[third.id].published == [other.outputs["out"]]
    assert set(recorded) == shared_closure | {other.outputs["out"]}
    # a path new to the cache belongs to the first build that needed it
    assert {recorded[p].build_id for p in shared_closure} == {first.id}
    assert recorded[other.outputs["out"]].build_id == third.id
    assert all(results[b].signed for b in (first.id, second.id, third.id))
    assert set(results[first.id].added) == shared_closure
    assert results[second.id].added == results[first.id].added
    links = set(db.execute(select(NarInfoProject.store_path, NarInfoProject.project_id)))
    assert {(p, second.project_id) for p in shared_closure} <= links
    assert {(p, first.project_id) for p in shared_closure} <= links
    db.expire_all()
    assert all(db.get(Build, b).signed for b in (first.id, second.id, third.id))  # type: ignore[union-attr]
