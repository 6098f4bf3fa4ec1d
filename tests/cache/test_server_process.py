"""The production path: ``circus-server`` (gunicorn, sendfile, fast path) and a Nix client."""

from __future__ import annotations

import base64
import socket
import time
from collections.abc import Callable
from pathlib import Path

import requests
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from circus.cache.publish import publish_outputs
from circus.common.config import Settings
from tests.cache.support import (
    closure_expr,
    make_build,
    nix_build,
    nix_copy,
    simple_expr,
    store_has,
)
from tests.conftest import KeyPair
from tests.helpers.daemons import cache_server
from tests.helpers.net import wait_for_http


def test_circus_server_serves_nix_copy_with_head_and_cached_answers(
        committed_db: sessionmaker[Session], cache_settings: Callable[..., Settings],
        cache_key: KeyPair, other_key: KeyPair, database_url: str, redis_url: str,
        tmp_path: Path, nonce: str) -> None:
    settings = cache_settings()
    built = nix_build(closure_expr(nonce, blob_kib=400))
    with committed_db.begin() as session:
        publish_outputs(session, settings, make_build(session, built).id)
    daemon, port = cache_server(tmp_path, database_url=database_url, redis_url=redis_url,
                                cache_dir=settings.cache.cache_dir, workers=1)
    with daemon as server:
        base = f"http://127.0.0.1:{port}/nix-cache"
        wait_for_http(f"{base}/nix-cache-info", timeout=60)
        out = built.outputs["out"]
        hash_part = Path(out).name[:32]
        first = requests.get(f"{base}/{hash_part}.narinfo", timeout=10)
        again = requests.get(f"{base}/{hash_part}.narinfo", timeout=10)
        assert first.status_code == again.status_code == 200
        assert first.content == again.content
        assert first.headers["Content-Type"].startswith("text/x-nix-narinfo")
        head = requests.head(f"{base}/{hash_part}.narinfo", timeout=10)
        assert head.status_code == 200
        assert head.content == b""
        assert int(head.headers["Content-Length"]) == len(first.content)
        missing = "0" * 32
        for _ in range(2):  # a miss, then the cached miss
            assert requests.get(f"{base}/{missing}.narinfo", timeout=10).status_code == 404
        url = next(line.split(": ")[1] for line in first.text.splitlines()
                   if line.startswith("URL:"))
        size = int(next(line.split(": ")[1] for line in first.text.splitlines()
                        if line.startswith("FileSize:")))
        nar_head = requests.head(f"{base}/{url}", timeout=10)
        assert nar_head.status_code == 200
        assert int(nar_head.headers["Content-Length"]) == size
        assert "immutable" in nar_head.headers["Cache-Control"]
        assert len(requests.get(f"{base}/{url}", timeout=10).content) == size

        good = nix_copy(base, [out], cache_key.public, tmp_path / "good")
        assert good.returncode == 0, good.stderr + server.log()[-2000:]
        assert store_has(tmp_path / "good", out)
        bad = nix_copy(base, [out], other_key.public, tmp_path / "bad")
        assert bad.returncode != 0
        assert not store_has(tmp_path / "bad", out)
        assert server.alive()


class KeptAlive:
    """One HTTP/1.1 connection, written and read byte by byte (no client library that
    might open a new connection or add fields)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.file = self.sock.makefile("rb")

    def send(self, *requests: str) -> None:
        self.sock.sendall("".join(requests).encode())

    def read(self, head: bool = False) -> tuple[int, dict[str, str], bytes]:
        """(status, fields, the whole answer without its Date field)."""
        status = self.file.readline()
        lines = []
        while (line := self.file.readline()) != b"\r\n":
            assert line, "the server closed the connection"
            lines.append(line)
        fields = {name.strip().lower(): value.strip() for name, value in
                  (line.decode().split(":", 1) for line in lines)}
        body = b"" if head else self.file.read(int(fields["content-length"]))
        whole = status + b"".join(line for line in lines
                                  if not line.lower().startswith(b"date:")) + body
        return int(status.split()[1]), fields, whole

    def ask(self, request: str) -> tuple[int, dict[str, str], bytes]:
        self.send(request)
        return self.read(head=request.startswith("HEAD"))

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def request(method: str, path: str, fields: str = "") -> str:
    return f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{fields}\r\n"


def test_kept_alive_connections_get_the_apps_answers_and_private_caches_stay_private(
        committed_db: sessionmaker[Session], cache_settings: Callable[..., Settings],
        database_url: str, redis_url: str, tmp_path: Path, nonce: str) -> None:
    """circus-server's worker answers narinfo requests memory holds on its event loop (all
    but the first request of a kept-alive connection): the same bytes as the app, and
    never a private cache's answer without credentials."""
    from circus.auth.actor import Actor
    from circus.auth.service import create_api_key, create_user
    from circus.common.enums import MemberRole, Role
    from circus.common.models import ProjectMember

    settings = cache_settings()
    public = nix_build(simple_expr(nonce, body="public"))
    secret = nix_build(simple_expr(nonce, body="secret"))
    with committed_db.begin() as session:
        publish_outputs(session, settings, make_build(session, public, project="open").id)
        publish_outputs(session, settings, make_build(session, secret, project="vault").id)
        session.execute(text("UPDATE projects SET hidden = true WHERE name = 'vault'"))
        system = Actor.system("test")
        insider = create_user(session, system, username="insider", role=Role.read_only)
        vault = session.execute(text("SELECT id FROM projects WHERE name = 'vault'")).scalar_one()
        session.add(ProjectMember(project_id=vault, user_id=insider.id, role=MemberRole.member))
        _, member_key = create_api_key(session, system, name="in", role=Role.read_only,
                                       owner_id=insider.id)
    shared_hash = Path(public.outputs["out"]).name[:32]
    secret_hash = Path(secret.outputs["out"]).name[:32]
    member = "Authorization: Basic " + base64.b64encode(f"x:{member_key}".encode()).decode()
    daemon, port = cache_server(tmp_path, database_url=database_url, redis_url=redis_url,
                                cache_dir=settings.cache.cache_dir, workers=1)
    with daemon as server:
        wait_for_http(f"http://127.0.0.1:{port}/nix-cache/nix-cache-info", timeout=60)
        connection = KeptAlive(port)
        try:
            for method, path, status in (
                    ("GET", f"/nix-cache/{shared_hash}.narinfo", 200),
                    ("HEAD", f"/nix-cache/{shared_hash}.narinfo", 200),
                    ("GET", f"/nix-cache/{'0' * 32}.narinfo", 404),
                    ("GET", f"/projects/open/nix-cache/{shared_hash}.narinfo", 200),
                    # the shared cache does not serve what only the hidden project built
                    ("GET", f"/nix-cache/{secret_hash}.narinfo", 404)):
                answers = [connection.ask(request(method, path)) for _ in range(3)]
                assert answers[0][0] == status, (path, answers[0])
                # a new connection's first request goes through gunicorn's parser and the
                # app's WSGI fast path (its first answer here may have come from the views)
                fresh = KeptAlive(port)
                try:
                    through_the_app = fresh.ask(request(method, path))
                finally:
                    fresh.close()
                assert through_the_app[2] == answers[1][2] == answers[2][2], path
            # two requests in one write: two answers, in order
            connection.send(request("GET", f"/nix-cache/{shared_hash}.narinfo"),
                            request("GET", f"/nix-cache/{'1' * 32}.narinfo"))
            assert [connection.read()[0] for _ in range(2)] == [200, 404]

            private = f"/projects/vault/nix-cache/{secret_hash}.narinfo"
            for _ in range(3):  # right after a member's answer on the same connection too
                refused = connection.ask(request("GET", private))
                assert refused[0] == 401
                assert refused[1]["www-authenticate"].startswith("Basic")
                allowed = connection.ask(request("GET", private, f"{member}\r\n"))
                assert allowed[0] == 200
                assert allowed[1]["cache-control"] == "private, no-store"
                assert connection.ask(request("HEAD", private))[0] == 401

            # retention deletes the path: the connection's next answers are 404s at once
            with committed_db.begin() as session:
                session.execute(text("DELETE FROM narinfo_cache WHERE hash_part = :h"),
                                {"h": shared_hash})
            deadline = time.monotonic() + 10
            while connection.ask(request("GET", f"/nix-cache/{shared_hash}.narinfo"))[0] != 404:
                assert time.monotonic() < deadline, "a deleted path was still served"
                time.sleep(0.01)
            for _ in range(3):
                assert connection.ask(
                    request("GET", f"/nix-cache/{shared_hash}.narinfo"))[0] == 404
        finally:
            connection.close()
        assert server.alive()


def batch_connections(committed_db: sessionmaker[Session], terminate: bool = False) -> int:
    """How many of the workers' batch lookup connections are open (``terminate``: ended
    by the database first, as when it restarts)."""
    with committed_db.begin() as session:
        return len(session.execute(text(
            f"""SELECT {'pg_terminate_backend(pid)' if terminate else 'pid'}
                FROM pg_stat_activity WHERE application_name = 'circus-narinfo-batches'""")
        ).all())


def test_cold_lookups_are_batched_on_the_event_loop_and_survive_a_lost_connection(
        committed_db: sessionmaker[Session], cache_settings: Callable[..., Settings],
        database_url: str, redis_url: str, tmp_path: Path, nonce: str) -> None:
    settings = cache_settings()
    built = nix_build(closure_expr(nonce, blob_kib=4))
    with committed_db.begin() as session:
        publish_outputs(session, settings, make_build(session, built).id)
    paths = [built.outputs["out"], built.outputs["doc"]]
    narinfo = [f"/nix-cache/{Path(path).name[:32]}.narinfo" for path in paths]
    # an LRU of one answer: asking for the two paths in turn, every lookup is cold
    daemon, port = cache_server(tmp_path, database_url=database_url, redis_url=redis_url,
                                cache_dir=settings.cache.cache_dir, workers=1,
                                cache_options="narinfo_cache_size = 1")
    with daemon as server:
        wait_for_http(f"http://127.0.0.1:{port}/nix-cache/nix-cache-info", timeout=60)
        through_the_app = []
        for path in narinfo:  # a new connection's first request: the pool and the app
            fresh = KeptAlive(port)
            through_the_app.append(fresh.ask(request("GET", path)))
            fresh.close()
        assert [answer[0] for answer in through_the_app] == [200, 200]
        connections = [KeptAlive(port) for _ in range(6)]
        try:
            for connection in connections:
                assert connection.ask(request("GET", "/nix-cache/nix-cache-info"))[0] == 200
            for _ in range(3):
                # several connections at once: their lookups share queries
                for n, connection in enumerate(connections):
                    connection.send(request("GET", narinfo[n % 2]))
                for n, connection in enumerate(connections):
                    assert connection.read()[2] == through_the_app[n % 2][2]
            assert batch_connections(committed_db) >= 1
            # two requests in one write: answered in order, the second after the first
            connections[0].send(request("GET", narinfo[0]), request("HEAD", narinfo[1]),
                                request("GET", narinfo[1]))
            assert connections[0].read()[2] == through_the_app[0][2]
            assert connections[0].read(head=True)[0] == 200
            assert connections[0].read()[2] == through_the_app[1][2]

            # the database ends the batch connection: no request is lost (the pool
            # answers until the worker has connected again)
            assert batch_connections(committed_db, terminate=True) >= 1
            deadline = time.monotonic() + 10
            while True:
                for n, connection in enumerate(connections):
                    connection.send(request("GET", narinfo[n % 2]))
                for n, connection in enumerate(connections):
                    assert connection.read()[2] == through_the_app[n % 2][2]
                if batch_connections(committed_db) >= 1:
                    break
                assert time.monotonic() < deadline, "the batch connection never came back"
                time.sleep(0.05)
        finally:
            for connection in connections:
                connection.close()
        assert server.alive()
        assert "narinfo batch lookup failed" in server.log()
        assert "Traceback" not in server.log()
