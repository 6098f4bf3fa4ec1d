"""The production path: ``circus-server`` (gunicorn, sendfile, fast path) and a Nix client."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import requests
from sqlalchemy.orm import Session, sessionmaker

from circus.cache.publish import publish_outputs
from circus.common.config import Settings
from tests.cache.support import closure_expr, make_build, nix_build, nix_copy, store_has
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
