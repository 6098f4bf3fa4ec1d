"""The store seam: ``nix path-info --json`` of every Nix version read alike, and the
sync and async front ends asking the real store the same questions."""

from __future__ import annotations

import asyncio
import json
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from circus.common.nix import store
from circus.common.nix.store import PathInfo, StoreError, aio, parse_path_info, queries
from tests.cache.support import closure_expr, nix_build, simple_expr

FIXTURES = Path(__file__).parents[1] / "fixtures" / "nix-path-info"
TOP = "/nix/store/drrv4f10d4j3bmy0m6f29z7ir4937h5q-circus-fixture-top"
DEP = "/nix/store/13m0accb60zh82hrpfz5qa4byx11xg5m-circus-fixture-dep"
SOURCE = "/nix/store/jgicz8j6ip981s35dkn256l253lb860a-circus-fixture-source.txt"
MISSING = "/nix/store/00000000000000000000000000000000-circus-fixture-missing"

# base-32 forms by ``nix hash to-base32`` of the recorded SRI hashes
SOURCE_INFO = PathInfo(
    path=SOURCE, nar_hash="sha256:062yjig02ci7z1qs1z18qxnbl19h0gss8m0ymlsqx6kb1j2vcq1n",
    nar_size=120, references=(), deriver=None,
    ca="fixed:r:sha256:062yjig02ci7z1qs1z18qxnbl19h0gss8m0ymlsqx6kb1j2vcq1n", closure_size=120)
EXPECTED = {
    TOP: PathInfo(
        path=TOP, nar_hash="sha256:04wj00lm2g7hb5maqh979p7yrr3lpljfpw8m066cf4qnwv78mi3l",
        nar_size=176, references=(DEP,),
        deriver="/nix/store/z7my2rdgw3bdajz8g2ljy4kylxaqrrx3-circus-fixture-top.drv",
        ca=None, closure_size=296),
    SOURCE: SOURCE_INFO,
    MISSING: None,
}


@pytest.mark.parametrize("fixture", [
    "nix-2.8-closure-size.json",  # list form, recorded
    "nix-2.24-closure-size.json",  # object keyed by path (2.19+)
    "nix-json-format-2-closure-size.json",  # wrapped, base names, structured ca
])
def test_every_json_shape_reads_the_same(fixture: str) -> None:
    assert parse_path_info((FIXTURES / fixture).read_text()) == EXPECTED


def test_a_recursive_answer_orders_dependencies_first() -> None:
    infos = parse_path_info((FIXTURES / "nix-2.8-recursive.json").read_text())
    assert set(infos) == {TOP, DEP}
    valid = {path: info for path, info in infos.items() if info is not None}
    assert store.dependency_order(valid) == [DEP, TOP]


def test_structured_hashes_are_normalised() -> None:
    # a development version of JSON format 2 printed hashes as objects
    digest = {"algorithm": "sha256", "format": "base64",
              "hash": "NmC2hQxrmo41rR5UpPUDMAW6bMco/KBx+CcyAV6UXhg="}
    text = json.dumps({SOURCE: {"narHash": digest, "narSize": 120, "references": [],
                                "ca": {"method": "nar", "hash": digest}}})
    assert parse_path_info(text)[SOURCE] == replace(SOURCE_INFO, closure_size=None)


@pytest.mark.parametrize("text", [
    "not json", "42", '[{"narHash": "sha256-x"}]',
    json.dumps({TOP: {"narHash": "md4-AAAA", "narSize": 1, "references": []}}),
    json.dumps({TOP: {"narHash": "sha256:abc", "narSize": 1, "references": []}}),
    json.dumps({"/etc/passwd": None}),
    json.dumps({TOP: {"narHash": SOURCE_INFO.nar_hash, "narSize": 1,
                      "references": ["../../etc"]}}),
])
def test_unreadable_output_is_a_store_error(text: str) -> None:
    with pytest.raises(StoreError, match="unexpected nix path-info output"):
        parse_path_info(text)


def test_queries_refuse_what_is_not_a_store_path() -> None:
    for bad in ("--option", "/etc/passwd", f"{TOP}/../../etc"):
        with pytest.raises(StoreError, match="not a store path"):
            queries.invalid_paths([TOP, bad])


def test_queries_are_chunked_and_combined_in_order() -> None:
    paths = [f"/nix/store/{i:032d}-p" for i in range(queries.CHUNK * 2 + 1)]
    query = queries.invalid_paths([*paths, paths[0]])
    assert [len(argv) for argv in query.argvs] == [4 + queries.CHUNK] * 2 + [5]
    assert all(argv[3] == "--" for argv in query.argvs)
    # Nix prints invalid paths in its own order; the answer keeps the caller's
    answer = query.combine([[paths[5], paths[1]], [], [paths[-1]]])
    assert answer == [paths[1], paths[5], paths[-1]]
    assert queries.requisites([TOP, DEP]).combine([[DEP, TOP], [DEP]]) == [DEP, TOP]


def test_sync_and_async_ask_the_real_store_alike(nix_env: dict[str, str], nonce: str
                                                 ) -> None:
    built = nix_build(closure_expr(nonce, blob_kib=1))
    out, doc = built.outputs["out"], built.outputs["doc"]
    gone = out[:-1] + ("x" if not out.endswith("x") else "y")

    async def ask_async() -> tuple[object, ...]:
        return (await aio.invalid_paths([gone, out, doc], nix_env),
                await aio.requisites([out], nix_env),
                await aio.path_infos([out, gone], nix_env, closure_size=True),
                await aio.derivation_outputs(built.drv_path, nix_env))

    sync = (store.invalid_paths([gone, out, doc], nix_env),
            store.requisites([out], nix_env),
            store.path_infos([out, gone], nix_env, closure_size=True),
            store.derivation_outputs(built.drv_path, nix_env))
    assert asyncio.run(ask_async()) == sync
    invalid, closure, infos, outputs = sync
    assert invalid == [gone]
    assert len(closure) == 2
    assert closure[-1] == out  # the dependency comes first
    assert set(infos) == {out}
    info = infos[out]
    assert info.references == (closure[0],)
    assert info.deriver == built.drv_path
    assert info.closure_size == sum(i.nar_size for i in store.path_infos(closure, nix_env).values())
    assert sorted(outputs) == sorted(built.outputs.values())
    recursive = store.path_infos([out], nix_env, recursive=True)
    assert store.dependency_order(recursive) == closure
    assert store.missing([built.drv_path], nix_env).to_build == set()
    unbuilt = subprocess.run(["nix-instantiate", "-E", simple_expr(nonce)], env=nix_env,
                             capture_output=True, text=True, check=True).stdout.strip()
    assert store.missing([unbuilt, built.drv_path], nix_env).to_build == {unbuilt}
    with pytest.raises(StoreError, match="nix path-info failed"):
        store.path_infos([gone], nix_env, recursive=True)
