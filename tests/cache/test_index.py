"""The servers' in-memory index of recorded hash parts (``known.py``): kept current by
narinfo_cache's NOTIFY triggers, rebuilt by a new process and after a lost connection,
and used by the WSGI fast path to answer misses without a query."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from circus.cache.publish import publish_outputs
from circus.common.config import Settings
from circus.common.db import make_engine
from circus.common.models import Project
from circus.common.nix import base32
from circus.server.app import create_app
from circus.server.cache.fastpath import ColdLookup, NarinfoFastPath
from circus.server.cache.lookup import ABSENT, CacheIndex
from circus.server.security import SECURITY_HEADERS
from tests.cache.support import make_build, nix_build, simple_expr


def eventually(predicate: Callable[[], bool], within: float) -> bool:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def live_index(index: CacheIndex) -> CacheIndex:
    index.known.surely_absent("0" * 32)  # the first lookup starts the listener
    assert eventually(lambda: index.known.live, 10), "the index never loaded"
    return index


@pytest.fixture
def app(cache_settings: Callable[..., Settings], nonce: str) -> Iterator[Flask]:
    settings = cache_settings()
    engine = make_engine(settings, pool_size=2, application_name=f"index-test-{nonce}")
    app = create_app(settings, engine=engine)
    try:
        yield app
    finally:
        app.extensions["circus_cache"].close()
        engine.dispose()


def fake_hashes(count: int) -> list[str]:
    return [base32.encode(os.urandom(20)) for _ in range(count)]


def insert_fake_rows(session: Session, hashes: list[str]) -> None:
    """Rows for paths that exist nowhere (the index reads nothing but hash parts)."""
    session.execute(text("""
        INSERT INTO narinfo_cache (store_path, hash_part, nar_hash, nar_size, compression, url)
        SELECT '/nix/store/' || h || '-fake', h, 'sha256:' || h, 1, 'none', 'nar/' || h || '.nar'
        FROM unnest(CAST(:hashes AS text[])) AS h"""), {"hashes": hashes})


def test_publish_and_deletion_reach_the_index_and_the_fast_path_within_a_second(
        app: Flask, committed_db: sessionmaker[Session], cache_settings: Callable[..., Settings],
        nonce: str) -> None:
    index = live_index(app.extensions["circus_cache"])
    client = app.test_client()
    built = nix_build(simple_expr(nonce))
    hash_part = Path(built.outputs["out"]).name[:32]
    url = f"/nix-cache/{hash_part}.narinfo"

    def no_query(*args: Any) -> Any:
        raise AssertionError(f"a miss the index knows queried the database: {args}")

    real_rows, index.queries.rows = index.queries.rows, no_query  # type: ignore[method-assign]
    miss = client.get(url)
    index.queries.rows = real_rows  # type: ignore[method-assign]
    assert miss.status_code == 404
    assert miss.json == {"error": "no such path in this cache", "details": None}

    with committed_db.begin() as session:
        publish_outputs(session, cache_settings(), make_build(session, built).id)
    assert eventually(lambda: not index.known.surely_absent(hash_part), 1.0)
    hit = client.get(url)
    assert hit.status_code == 200
    assert f"StorePath: {built.outputs['out']}" in hit.text
    for response in (miss, hit):  # the fast path sends the headers Flask's answers carry
        for name, value in SECURITY_HEADERS.items():
            assert response.headers[name] == value
        assert "default-src 'self'" in response.headers["Content-Security-Policy"]

    with committed_db.begin() as session:  # what retention does, by any writer
        session.execute(text("DELETE FROM narinfo_cache WHERE hash_part = :h"), {"h": hash_part})
    assert eventually(lambda: index.known.surely_absent(hash_part), 1.0)
    # the LRU held the text; the deletion dropped it too
    assert client.get(url).status_code == 404


def test_a_new_index_loads_everything_and_a_lost_connection_reloads(
        app: Flask, committed_db: sessionmaker[Session], nonce: str) -> None:
    index = live_index(app.extensions["circus_cache"])
    # more hash parts in one statement than one notification carries
    bulk = fake_hashes(450)
    with committed_db.begin() as session:
        insert_fake_rows(session, bulk)
    assert eventually(lambda: not any(index.known.surely_absent(h) for h in bulk), 1.0)

    restarted = live_index(CacheIndex(index.queries.engine, app.extensions["circus"]
                                      .settings.cache))
    try:
        assert not any(restarted.known.surely_absent(h) for h in bulk)
        assert restarted.known.surely_absent(fake_hashes(1)[0])

        # the listener's connection dies; what is committed meanwhile is not notified
        # to it, but the reload after reconnecting finds it
        later = fake_hashes(3)
        with committed_db.begin() as session:
            session.execute(text("""SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                                    WHERE application_name = :name"""),
                            {"name": f"index-test-{nonce}"})
            insert_fake_rows(session, later)
            session.execute(text("DELETE FROM narinfo_cache WHERE hash_part = :h"),
                            {"h": bulk[0]})
        for known in (index.known, restarted.known):
            assert eventually(lambda k=known: all(not k.surely_absent(h) for h in later)  # type: ignore[misc]
                              and k.surely_absent(bulk[0]), 10)
        # lookups work again on new connections (the old ones were terminated too)
        assert restarted.narinfo(bulk[1]) is not None
    finally:
        restarted.close()


def test_event_loop_answers_only_simple_requests_and_only_from_memory(
        app: Flask, committed_db: sessionmaker[Session], cache_settings: Callable[..., Settings],
        nonce: str) -> None:
    """``raw_response``: what circus-server's worker answers on its event loop, without
    gunicorn's parser; None leaves a request to gunicorn and the app."""
    index = live_index(app.extensions["circus_cache"])
    fastpath = app.wsgi_app
    assert isinstance(fastpath, NarinfoFastPath)
    built = nix_build(simple_expr(nonce))
    hash_part = Path(built.outputs["out"]).name[:32]
    with committed_db.begin() as session:
        publish_outputs(session, cache_settings(), make_build(session, built).id)
        session.add(Project(name="vault", hidden=True))
    assert eventually(lambda: not index.known.surely_absent(hash_part), 1.0)

    def request(line: str, fields: str = "Host: 127.0.0.1\r\nUser-Agent: Nix/2.18\r\n") -> bytes:
        return f"{line}\r\n{fields}\r\n".encode()

    get = request(f"GET /nix-cache/{hash_part}.narinfo HTTP/1.1")
    # recorded, but only the database has the text yet: the worker is to ask it
    assert fastpath.raw_response(get) == ColdLookup(hash_part, head=False)
    text_ = app.test_client().get(f"/nix-cache/{hash_part}.narinfo").data  # fills the LRU
    hit = fastpath.raw_response(get)
    assert hit is not None
    assert hit.startswith(b"HTTP/1.1 200 OK\r\n")
    assert hit.endswith(text_)
    assert f"\r\nContent-Length: {len(text_)}\r\n".encode() in hit
    assert b"\r\nX-Content-Type-Options: nosniff\r\n" in hit
    head = fastpath.raw_response(request(f"HEAD /nix-cache/{hash_part}.narinfo HTTP/1.1"))
    assert head is not None
    assert head == hit[:-len(text_)]
    missing = fake_hashes(1)[0]
    miss = fastpath.raw_response(request(f"GET /nix-cache/{missing}.narinfo HTTP/1.1"))
    assert miss is not None
    assert miss.startswith(b"HTTP/1.1 404 NOT FOUND\r\n")
    assert miss.endswith(b'{"error": "no such path in this cache", "details": null}')
    # a public project's cache once the app has seen the project; never a hidden one's,
    # whose answers need the views' credential check
    assert fastpath.raw_response(request(
        f"GET /projects/demo/nix-cache/{missing}.narinfo HTTP/1.1")) is None
    app.test_client().get(f"/projects/demo/nix-cache/{missing}.narinfo")
    assert fastpath.raw_response(request(
        f"GET /projects/demo/nix-cache/{missing}.narinfo HTTP/1.1")) is not None
    for _ in range(2):
        assert app.test_client().get(
            f"/projects/vault/nix-cache/{missing}.narinfo").status_code == 401
        assert fastpath.raw_response(request(
            f"GET /projects/vault/nix-cache/{missing}.narinfo HTTP/1.1")) is None

    path = f"/nix-cache/{hash_part}.narinfo"
    unusual = [
        get + get,  # pipelined: gunicorn reads them one by one
        get[:-2],  # not complete yet
        request(f"GET {path} HTTP/1.0"),
        request(f"get {path} HTTP/1.1"),
        request(f"POST {path} HTTP/1.1", "Content-Length: 0\r\n"),
        request(f"GET http://127.0.0.1{path} HTTP/1.1"),
        request(f"GET {path}?x=1 HTTP/1.1"),
        request(f"GET {path.replace('/nix-cache', '/nix%2Dcache')} HTTP/1.1"),
        request(f"GET /nix-cache/../nix-cache/{hash_part}.narinfo HTTP/1.1"),
        request(f"GET {path} HTTP/1.1", "Content-Length: 5\r\n"),
        request(f"GET {path} HTTP/1.1", "Transfer-Encoding: chunked\r\n"),
        request(f"GET {path} HTTP/1.1", "Host: x\r\ncontent-length : 0\r\n"),
        request(f"GET {path} HTTP/1.1", "Host: x\r\nConnection: close\r\n"),
        request(f"GET {path} HTTP/1.1", "Upgrade: h2c\r\n"),
        request(f"GET {path} HTTP/1.1", "Host: x\r\nX-Folded: a\r\n b\r\n"),
        request(f"GET {path} HTTP/1.1", "Host: x\nX-Bare-LF: a\r\n"),
        request(f"GET {path} HTTP/1.1", "Host: x\r\nX-Nul: a\x00b\r\n"),
        # a caller with credentials (a remote worker) may read more than anyone: the views
        request(f"GET /nix-cache/{missing}.narinfo HTTP/1.1",
                "Host: x\r\nAuthorization: Basic d29ya2VyOnRva2Vu\r\n"),
        request(f"GET {path} HTTP/1.1", "Host: x\r\nauthorization :Bearer k\r\n"),
    ]
    for bad in unusual:
        assert fastpath.raw_response(bad) is None, bad
    for fields in ("Connection: keep-alive\r\n", "Host: x\r\nconnection:Keep-Alive \r\n"):
        answered = fastpath.raw_response(request(f"GET {path} HTTP/1.1", fields))
        assert isinstance(answered, bytes)
        assert answered.startswith(b"HTTP/1.1 200 OK\r\n")
        assert answered.endswith(text_)
    assert fastpath.raw_response(request(
        f"GET {path} HTTP/1.1", "Connection: keep-alive, close\r\n")) is None

    # retention (or any writer) deletes the path: memory forgets the text at once
    with committed_db.begin() as session:
        session.execute(text("DELETE FROM narinfo_cache WHERE hash_part = :h"), {"h": hash_part})
    assert eventually(lambda: index.known.surely_absent(hash_part), 1.0)
    assert eventually(lambda: (fastpath.raw_response(get) or b"").startswith(
        b"HTTP/1.1 404 NOT FOUND\r\n"), 1.0)


def test_an_answer_looked_up_across_a_change_is_sent_but_not_kept(
        app: Flask, committed_db: sessionmaker[Session]) -> None:
    """A lookup that read a row just before retention deleted it may still answer its own
    request (the database said so then), but the LRU must not keep it: the deletion's
    notification, already applied, would never drop it."""
    index = live_index(app.extensions["circus_cache"])
    kept, deleted = fake_hashes(2)
    with committed_db.begin() as session:
        insert_fake_rows(session, [kept, deleted])
    assert eventually(lambda: not index.known.surely_absent(deleted), 1.0)

    since = index.generation
    row = index.queries.rows("circus_narinfo", deleted)[0]  # read before the deletion
    with committed_db.begin() as session:
        session.execute(text("DELETE FROM narinfo_cache WHERE hash_part = :h"), {"h": deleted})
    assert eventually(lambda: index.generation != since, 1.0)
    assert index.answer(deleted, None, row, since) is not None
    assert index.cached_narinfo(deleted) is ABSENT
    assert index.narinfo(deleted) is None

    since = index.generation  # nothing changes meanwhile: the answer is kept
    body = index.answer(kept, None, index.queries.rows("circus_narinfo", kept)[0], since)
    assert body is not None
    assert index.cached_narinfo(kept) == body
