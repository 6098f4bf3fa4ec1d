"""A real Nix client fetches and verifies what Circus built from /nix-cache."""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import requests
from sqlalchemy.orm import Session, sessionmaker

from circus.cache.publish import publish_outputs
from circus.common.config import Settings
from tests.cache.support import (
    closure_expr,
    make_build,
    nix_build,
    nix_client_env,
    nix_copy,
    serve,
    simple_expr,
    store_has,
)
from tests.conftest import KeyPair


@pytest.mark.parametrize("compression", ["zstd", "xz", "none"])
def test_nix_copy_from_circus_verifies_signatures(
        compression: str, committed_db: sessionmaker[Session],
        cache_settings: Callable[..., Settings], cache_key: KeyPair, other_key: KeyPair,
        tmp_path: Path, nonce: str) -> None:
    settings = cache_settings(cache={"compression": compression})
    built = nix_build(closure_expr(nonce, blob_kib=300))
    with committed_db.begin() as session:
        build = make_build(session, built)
        publish_outputs(session, settings, build.id)
    out = built.outputs["out"]
    dep = Path(out, "dep-path").read_text().strip()

    with serve(settings) as base:
        info = requests.get(f"{base}/nix-cache/nix-cache-info", timeout=10)
        assert info.status_code == 200
        assert "StoreDir: /nix/store" in info.text

        good = nix_copy(f"{base}/nix-cache", [out], cache_key.public, tmp_path / "good")
        assert good.returncode == 0, good.stderr
        assert store_has(tmp_path / "good", out)
        assert store_has(tmp_path / "good", dep)
        blob = Path(dep, "share/blob").read_bytes()
        assert (tmp_path / "good" / dep.lstrip("/") / "share/blob").read_bytes() == blob

        bad = nix_copy(f"{base}/nix-cache", [out], other_key.public, tmp_path / "bad")
        assert bad.returncode != 0
        assert "lacks a valid signature" in bad.stderr
        assert not store_has(tmp_path / "bad", out)


def test_nix_store_realise_substitutes_from_circus(
        committed_db: sessionmaker[Session], cache_settings: Callable[..., Settings],
        cache_key: KeyPair, tmp_path: Path, nonce: str) -> None:
    settings = cache_settings()
    built = nix_build(simple_expr(nonce))
    with committed_db.begin() as session:
        build = make_build(session, built)
        publish_outputs(session, settings, build.id)
    out = built.outputs["out"]
    store = tmp_path / "store"
    with serve(settings) as base:
        done = subprocess.run(
            ["nix-store", "--store", str(store), "--realise", out,
             "--option", "substituters", f"{base}/nix-cache",
             "--option", "trusted-public-keys", cache_key.public],
            capture_output=True, text=True, env=nix_client_env(tmp_path), timeout=120)
    assert done.returncode == 0, done.stderr
    assert (store / out.lstrip("/")).read_text() == Path(out).read_text()


def test_project_caches_serve_only_their_projects_paths(
        committed_db: sessionmaker[Session], cache_settings: Callable[..., Settings],
        cache_key: KeyPair, tmp_path: Path, nonce: str) -> None:
    settings = cache_settings()
    mine = nix_build(simple_expr(nonce, body="mine"))
    theirs = nix_build(simple_expr(nonce, body="theirs"))
    with committed_db.begin() as session:
        publish_outputs(session, settings, make_build(session, mine, project="alpha").id)
        publish_outputs(session, settings, make_build(session, theirs, project="beta").id)
    path, other = mine.outputs["out"], theirs.outputs["out"]
    with serve(settings) as base:
        alpha = f"{base}/projects/alpha/nix-cache"
        hash_of = lambda p: Path(p).name[:32]  # noqa: E731
        assert requests.get(f"{alpha}/{hash_of(path)}.narinfo", timeout=10).status_code == 200
        assert requests.get(f"{alpha}/{hash_of(other)}.narinfo", timeout=10).status_code == 404
        # no such project: anonymous callers are asked for credentials (as for a hidden
        # project, so the answer does not tell the two apart); known callers get a 404
        assert requests.get(f"{base}/projects/gamma/nix-cache/{hash_of(path)}.narinfo",
                            timeout=10).status_code == 401
        # beta's NAR is not reachable through alpha's cache either
        narinfo = requests.get(f"{base}/nix-cache/{hash_of(other)}.narinfo", timeout=10).text
        url = next(line.split(": ")[1] for line in narinfo.splitlines()
                   if line.startswith("URL:"))
        assert requests.get(f"{base}/nix-cache/{url}", timeout=10).status_code == 200
        assert requests.get(f"{alpha}/{url}", timeout=10).status_code == 404

        copied = nix_copy(alpha, [path], cache_key.public, tmp_path / "alpha")
        assert copied.returncode == 0, copied.stderr
        refused = nix_copy(alpha, [other], cache_key.public, tmp_path / "beta")
        assert refused.returncode != 0
        assert not store_has(tmp_path / "beta", other)


def test_a_hidden_projects_cache_is_private(
        committed_db: sessionmaker[Session], cache_settings: Callable[..., Settings],
        cache_key: KeyPair, tmp_path: Path, nonce: str) -> None:
    from sqlalchemy import text

    from circus.auth.actor import Actor
    from circus.auth.service import create_api_key, create_user
    from circus.common.enums import MemberRole, Role
    from circus.common.models import ProjectMember

    settings = cache_settings()
    secret = nix_build(simple_expr(nonce, body="secret"))
    shared = nix_build(simple_expr(nonce, body="shared"))
    system = Actor.system("test")
    with committed_db.begin() as session:
        publish_outputs(session, settings, make_build(session, secret, project="vault").id)
        # one path built by the hidden project and by a visible one stays shared
        publish_outputs(session, settings, make_build(session, shared, project="vault",
                                                      job="both").id)
        publish_outputs(session, settings, make_build(session, shared, project="open").id)
        session.execute(text("UPDATE projects SET hidden = true WHERE name = 'vault'"))
        insider = create_user(session, system, username="insider", role=Role.read_only)
        outsider = create_user(session, system, username="outsider", role=Role.read_only)
        vault = session.execute(text("SELECT id FROM projects WHERE name = 'vault'")).scalar_one()
        session.add(ProjectMember(project_id=vault, user_id=insider.id, role=MemberRole.member))
        _, member_key = create_api_key(session, system, name="in", role=Role.read_only,
                                       owner_id=insider.id)
        _, other_key = create_api_key(session, system, name="out", role=Role.read_only,
                                      owner_id=outsider.id)
    out, both = secret.outputs["out"], shared.outputs["out"]
    hash_of = lambda p: Path(p).name[:32]  # noqa: E731
    with serve(settings) as base:
        private = f"{base}/projects/vault/nix-cache"
        # the shared cache no longer announces what only the hidden project built
        assert requests.get(f"{base}/nix-cache/{hash_of(out)}.narinfo",
                            timeout=10).status_code == 404
        assert requests.get(f"{base}/nix-cache/{hash_of(both)}.narinfo",
                            timeout=10).status_code == 200
        anonymous = requests.get(f"{private}/{hash_of(out)}.narinfo", timeout=10)
        assert anonymous.status_code == 401
        assert anonymous.headers["WWW-Authenticate"].startswith("Basic")
        assert requests.get(f"{private}/nix-cache-info", timeout=10).status_code == 401
        assert requests.get(f"{private}/{hash_of(out)}.narinfo", auth=("x", other_key),
                            timeout=10).status_code == 404
        assert requests.get(f"{private}/{hash_of(out)}.narinfo", auth=("x", "bogus"),
                            timeout=10).status_code == 401
        for _ in range(2):  # the second answer would come from the LRU if it were kept
            assert requests.get(f"{private}/{hash_of(out)}.narinfo", timeout=10
                                ).status_code == 401
            assert requests.get(f"{private}/{hash_of(out)}.narinfo", auth=("x", member_key),
                                timeout=10).status_code == 200
        bearer = requests.get(f"{private}/{hash_of(out)}.narinfo", timeout=10,
                              headers={"Authorization": f"Bearer {member_key}"})
        assert bearer.status_code == 200

        # a real Nix client: credentials from a netrc file, as Nix users configure them
        refused = nix_copy(private, [out], cache_key.public, tmp_path / "anon")
        assert refused.returncode != 0
        netrc = tmp_path / "netrc"
        netrc.write_text(f"machine 127.0.0.1 login circus password {member_key}\n")
        copied = subprocess.run(
            ["nix", "copy", "--from", private, "--to", str(tmp_path / "member"), out,
             "--option", "trusted-public-keys", cache_key.public,
             "--option", "netrc-file", str(netrc)],
            capture_output=True, text=True, env=nix_client_env(tmp_path), timeout=120)
        assert copied.returncode == 0, copied.stderr
        assert store_has(tmp_path / "member", out)


def test_fixed_output_paths_carry_their_content_address(
        committed_db: sessionmaker[Session], cache_settings: Callable[..., Settings],
        other_key: KeyPair, tmp_path: Path, nonce: str) -> None:
    content = f"fod {nonce}\n".encode()
    built = nix_build(
        f'derivation {{ name = "circus-cache-fod-{nonce}"; builder = "/bin/sh"; '
        'system = builtins.currentSystem; outputHashMode = "flat"; outputHashAlgo = "sha256"; '
        f'outputHash = "{hashlib.sha256(content).hexdigest()}"; '
        f'args = ["-c" "echo fod {nonce} > $out"]; }}')
    settings = cache_settings()
    with committed_db.begin() as session:
        publish_outputs(session, settings, make_build(session, built).id)
    out = built.outputs["out"]
    with serve(settings) as base:
        narinfo = requests.get(f"{base}/nix-cache/{Path(out).name[:32]}.narinfo", timeout=10)
        assert "\nCA: fixed:sha256:" in narinfo.text
        # Nix trusts a content-addressed path without a trusted signature only when the
        # CA field is right: the copy succeeds even with a foreign key
        copied = nix_copy(f"{base}/nix-cache", [out], other_key.public, tmp_path / "store")
    assert copied.returncode == 0, copied.stderr
    assert (tmp_path / "store" / out.lstrip("/")).read_bytes() == content
