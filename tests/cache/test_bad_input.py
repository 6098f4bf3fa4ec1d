"""Malformed hashes, traversal attempts and unknown paths: 4xx, and no file opened."""

from __future__ import annotations

import http.client
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from sqlalchemy.orm import Session, sessionmaker

from circus.cache.publish import publish_outputs
from circus.common.config import Settings
from circus.common.db import make_engine
from circus.server.app import create_app
from tests.cache.support import make_build, nix_build, serve, simple_expr

_opened: list[str] | None = None


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _opened is not None and event == "open" and isinstance(args[0], (str, bytes)):
        _opened.append(str(args[0]))


sys.addaudithook(_audit)


@contextmanager
def files_opened() -> Iterator[list[str]]:
    global _opened
    _opened = []
    try:
        yield _opened
    finally:
        _opened = None


HASH = "0" * 32
FILE = "1" * 52
BAD_REQUESTS = {
    # path: acceptable statuses
    f"/nix-cache/{'e' * 32}.narinfo": (400,),
    f"/nix-cache/{HASH[:31]}.narinfo": (400,),
    f"/nix-cache/{HASH}x.narinfo": (400,),
    f"/nix-cache/{HASH.upper()}.narinfo": (400,),
    "/nix-cache/../../../etc/passwd": (404,),
    "/nix-cache/..%2F..%2F..%2Fetc%2Fpasswd": (404,),
    "/nix-cache/%2e%2e/%2e%2e/etc/passwd.narinfo": (400, 404),
    "/nix-cache/nar/..%2F..%2F..%2Fetc%2Fpasswd": (404,),
    "/nix-cache/nar/%2e%2e": (400,),
    "/nix-cache/nar/../../etc/passwd": (404,),
    f"/nix-cache/nar/{FILE}.nar.gz": (400,),
    f"/nix-cache/nar/{FILE}.nar.zst%00": (400,),
    f"/nix-cache/nar/{FILE[:51]}.nar.zst": (400,),
    f"/nix-cache/nar/{'e' * 52}.nar": (400,),
    f"/nix-cache/nar/{FILE}.nar.zst/..": (404,),
    "/projects/..%2F..%2Fetc/nix-cache/nix-cache-info": (404,),
    "/projects/bad%20name/nix-cache/nix-cache-info": (404,),
    f"/projects/{'x' * 300}/nix-cache/{HASH}.narinfo": (404,),
    f"/projects/.hidden/nix-cache/nar/{FILE}.nar.zst": (404,),
    # well-formed but unknown
    f"/nix-cache/{HASH}.narinfo": (404,),
    f"/nix-cache/nar/{FILE}.nar.zst": (404,),
    f"/nix-cache/nar/{FILE}.nar": (404,),
    # anonymous: asked for credentials, as for a hidden project (see circus.server.cache)
    f"/projects/nope/nix-cache/{HASH}.narinfo": (401,),
}


@pytest.fixture
def planted(cache_settings: Callable[..., Settings]) -> Settings:
    """Settings whose cache dir holds NAR files no database row vouches for."""
    settings = cache_settings()
    nar_dir = Path(settings.cache.cache_dir, "nar")
    nar_dir.mkdir(parents=True)
    for name in (f"{FILE}.nar.zst", f"{FILE}.nar"):
        (nar_dir / name).write_bytes(b"secret bytes nobody published")
    return settings


def test_bad_requests_get_4xx_without_touching_files(planted: Settings) -> None:
    engine = make_engine(planted, pool_size=2)
    client = create_app(planted, engine=engine).test_client()
    try:
        for path, statuses in BAD_REQUESTS.items():
            for method in (client.get, client.head):
                with files_opened() as opened:
                    response = method(path)
                assert response.status_code in statuses, (path, response.status_code)
                assert b"secret bytes" not in response.data
                assert b"root:" not in response.data
                assert opened == [], (path, opened)
                if method is client.get:
                    assert response.is_json
        assert client.post(f"/nix-cache/{HASH}.narinfo").status_code == 405
        assert client.put(f"/nix-cache/nar/{FILE}.nar.zst", data=b"x").status_code == 405
    finally:
        engine.dispose()


def test_raw_http_traversal_over_a_real_socket(
        committed_db: sessionmaker[Session], planted: Settings, nonce: str) -> None:
    built = nix_build(simple_expr(nonce))
    with committed_db.begin() as session:
        publish_outputs(session, planted, make_build(session, built).id)
    good_hash = Path(built.outputs["out"]).name[:32]
    with serve(planted) as base:
        netloc = urlsplit(base).netloc

        def status(path: str, method: str = "GET") -> tuple[int, bytes]:
            # http.client sends the path exactly as given (no dot-segment cleanup)
            conn = http.client.HTTPConnection(netloc, timeout=10)
            try:
                conn.request(method, path)
                response = conn.getresponse()
                return response.status, response.read()
            finally:
                conn.close()

        for path, statuses in BAD_REQUESTS.items():
            with files_opened() as opened:
                code, body = status(path)
            assert code in statuses, (path, code)
            assert b"secret bytes" not in body
            assert opened == [], (path, opened)
        # the control: the published path is served, also by HEAD without a body
        code, body = status(f"/nix-cache/{good_hash}.narinfo")
        assert code == 200
        assert body.startswith(f"StorePath: {built.outputs['out']}".encode())
        url = next(line.split(b": ")[1] for line in body.splitlines() if line.startswith(b"URL"))
        with files_opened() as opened:
            code, nar_bytes = status(f"/nix-cache/{url.decode()}")
        assert code == 200
        assert opened == [str(Path(planted.cache.cache_dir, url.decode()))]
        assert nar_bytes == Path(planted.cache.cache_dir, url.decode()).read_bytes()
        for _ in range(2):  # the second answer comes from the in-process cache
            code, body = status(f"/nix-cache/{good_hash}.narinfo", "HEAD")
            assert code == 200
            assert body == b""


def test_a_disabled_cache_serves_nothing(cache_settings: Callable[..., Settings]) -> None:
    settings = cache_settings(cache={"enabled": False})
    engine = make_engine(settings, pool_size=1)
    try:
        client = create_app(settings, engine=engine).test_client()
        for path in ("/nix-cache/nix-cache-info", f"/nix-cache/{HASH}.narinfo",
                     "/projects/demo/nix-cache/nix-cache-info"):
            assert client.get(path).status_code == 404
    finally:
        engine.dispose()
