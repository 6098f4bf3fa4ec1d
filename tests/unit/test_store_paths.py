"""Content-addressed store paths computed as Nix computes them, checked against paths
``nix-instantiate`` made here, and the check every evaluator upload passes (a .drv or
source whose path does not fit its content or references is refused) on real exports."""

from __future__ import annotations

import hashlib
import io
import re
import subprocess
from pathlib import Path

import pytest

from circus.common.nix import nar, storepath
from circus.common.nix.derivation import read_derivation
from circus.common.nix.export import ExportRefused, verify_derivation_export
from tests.security.agents_support import export_of

#: dep: no inputs; top: an input derivation, sources of every kind (a file and a tree by
#: NAR hash, a text file referencing a source, a file by flat hash); multi: two outputs
EXPRESSION = """
let
  sys = builtins.currentSystem;
  dep = derivation { name = "ca-dep-@N@"; system = sys; builder = "/bin/sh";
                     args = [ "-c" "echo @N@ > $out" ]; };
in {
  inherit dep;
  top = derivation {
    name = "ca-top-@N@"; system = sys; builder = "/bin/sh";
    data = ./data.txt;
    tree = ./tree;
    script = builtins.toFile "ca-script-@N@" "cat ${./data.txt}";
    flat = builtins.path { path = ./tool.sh; recursive = false; name = "ca-flat-@N@"; };
    args = [ "-c" "read x < ${dep}; echo $x > $out" ];
  };
  multi = derivation { name = "ca-multi-@N@"; system = sys; builder = "/bin/sh";
                       outputs = [ "out" "dev" ]; args = [ "-c" "echo > $out; echo > $dev" ]; };
}
"""


def _nix(args: list[str], env: dict[str, str]) -> list[str]:
    return subprocess.run(args, capture_output=True, text=True, env=env,
                          check=True).stdout.split()


@pytest.fixture
def closure(tmp_path: Path, nix_env: dict[str, str], nonce: str) -> list[str]:
    """The .drv closure of EXPRESSION's derivations (dependencies first)."""
    (tmp_path / "data.txt").write_text(f"data {nonce}\n")
    (tmp_path / "tree" / "sub").mkdir(parents=True)
    (tmp_path / "tree" / "sub" / "a").write_text(nonce)
    tool = tmp_path / "tool.sh"
    tool.write_text(f"#!/bin/sh\necho {nonce}\n")
    tool.chmod(0o755)
    (tmp_path / "default.nix").write_text(EXPRESSION.replace("@N@", nonce[:12]))
    drvs = _nix(["nix-instantiate", str(tmp_path / "default.nix")], nix_env)
    return _nix(["nix-store", "--query", "--requisites", *drvs], nix_env)


def _references(path: str, env: dict[str, str]) -> list[str]:
    return _nix(["nix-store", "--query", "--references", path], env)


def test_computed_paths_are_the_ones_nix_made(closure: list[str],
                                              nix_env: dict[str, str]) -> None:
    kinds = {}
    for path in closure:
        name = storepath.name_of(path)
        references = _references(path, nix_env)
        if path.endswith(".drv"):
            drv = read_derivation(path)
            inputs = set(drv.input_drvs) | set(drv.input_srcs)
            assert inputs == set(references)
            digest = hashlib.sha256(Path(path).read_bytes()).digest()
            assert storepath.make_text_path(name, digest, inputs) == path
            kinds[name.split("-")[1]] = "text"
            continue
        nar_digest = nar.hash_path(path).nar_hash.digest
        computed = {"source": storepath.make_source_path(name, nar_digest, references)}
        if Path(path).is_file():
            digest = hashlib.sha256(Path(path).read_bytes()).digest()
            computed["text"] = storepath.make_text_path(name, digest, references)
            computed["flat"] = storepath.make_flat_path(name, digest)
        (kind,) = [k for k, p in computed.items() if p == path]
        kinds[name.split("-")[1] if name.startswith("ca-") else name] = kind
    assert kinds == {"dep": "text", "top": "text", "multi": "text", "data.txt": "source",
                     "tree": "source", "script": "text", "flat": "flat"}


def test_a_real_upload_passes(closure: list[str], nix_env: dict[str, str]) -> None:
    stream = subprocess.run(["nix-store", "--export", *closure], capture_output=True,
                            env=nix_env, check=True).stdout
    entries = verify_derivation_export(io.BytesIO(stream), "evaluator e")
    assert [e.path for e in entries] == closure


def _one(closure: list[str], prefix: str) -> str:
    (path,) = [p for p in closure if storepath.name_of(p).startswith(prefix)]
    return path


@pytest.mark.parametrize(("forgery", "reason"), [
    # another derivation (its builder's script changed) posing under top's path
    ("content", "is not the store path of its contents"),
    # top's own content, but a reference its inputs do not name, or one dropped
    ("extra-reference", "declares the references"),
    ("missing-reference", "declares the references"),
    # a source whose content is not the one its path was computed from
    ("source", "is not the store path of its contents"),
])
def test_a_path_that_does_not_fit_its_content_is_refused(
        closure: list[str], nix_env: dict[str, str], forgery: str, reason: str) -> None:
    top, data = _one(closure, "ca-top-"), _one(closure, "data.txt")
    contents = {p: Path(p).read_bytes() for p in closure if Path(p).is_file()}
    references = {p: _references(p, nix_env) for p in contents}
    if forgery == "content":
        contents[top] = contents[top].replace(b"echo $x > $out", b"echo evil > $out")
    elif forgery == "extra-reference":
        references[top].append(_one(closure, "ca-multi-"))
    elif forgery == "missing-reference":
        references[top].remove(_one(closure, "ca-dep-"))
    else:
        contents[data] = b"forged data\n"
    forged = data if forgery == "source" else top
    # the tree (a directory) stays out: export_of writes files, and a .drv may name a
    # source the server has already
    entries = [(p, contents[p]) for p in closure if p in contents]
    with pytest.raises(ExportRefused, match=f"{re.escape(forged)} {reason}"):
        verify_derivation_export(io.BytesIO(export_of(entries, references)), "evaluator e")
