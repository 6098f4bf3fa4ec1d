"""``circus.common.nix.gcroots.add_roots`` outside Nix's roots directory: a link per path
and, as ``nix-store --add-root --indirect`` makes it, an ``auto`` entry pointing to it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from circus.common.nix import gcroots

FIRST = "/nix/store/" + "a" * 32 + "-first"
SECOND = "/nix/store/" + "b" * 32 + "-second"


def test_new_links_replaced_links_and_their_indirect_roots(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NIX_STATE_DIR", str(tmp_path / "state"))
    roots = tmp_path / "roots"
    assert gcroots.add_roots(roots, [FIRST, SECOND, "not a store path"]) == 2
    for path in (FIRST, SECOND):
        link = roots / os.path.basename(path)
        assert os.readlink(link) == path
        assert os.readlink(gcroots._auto_root(link)) == str(link)
    # a root already there is not new; one pointing elsewhere is replaced
    stale = roots / os.path.basename(SECOND)
    stale.unlink()
    stale.symlink_to(FIRST)
    assert gcroots.add_roots(roots, [FIRST, SECOND]) == 1
    assert os.readlink(stale) == SECOND
    assert sorted(p.name for p in roots.iterdir()) == sorted(
        os.path.basename(p) for p in (FIRST, SECOND))
