"""GC roots as plain symlinks, registered as indirect roots without a Nix process.

A root is a symlink ``<roots dir>/<store path basename>`` → the store path. When
the directory lies under ``/nix/var/nix/gcroots`` the symlink alone protects the
path; elsewhere each link is registered as an indirect root, exactly as
``nix-store --add-root --indirect`` does it (``gcroots/auto/<nix-base32 SHA-1 of
the link path>`` → link). Removing the link releases the root: Nix drops an
``auto`` entry whose link is gone at its next collection.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from circus.common.nix import base32, storepath

log = logging.getLogger(__name__)

NIX_GCROOTS = "/nix/var/nix/gcroots"


def nix_state_dir() -> Path:
    return Path(os.environ.get("NIX_STATE_DIR", "/nix/var/nix"))


def _auto_root(link: Path) -> Path:
    digest = hashlib.sha1(str(link).encode(), usedforsecurity=False).digest()
    return nix_state_dir() / "gcroots" / "auto" / base32.encode(digest)


def _symlink(link: Path, target: str) -> None:
    """Create or replace ``link`` atomically."""
    partial = link.with_name(link.name + ".partial")
    if partial.is_symlink():
        partial.unlink()
    partial.symlink_to(target)
    partial.replace(link)


def _direct(roots_dir: Path) -> bool:
    real = os.path.realpath(roots_dir)
    return real == os.path.realpath(NIX_GCROOTS) or \
        real.startswith(os.path.realpath(NIX_GCROOTS) + "/")


def add_roots(roots_dir: Path, paths: Iterable[str]) -> int:
    """Root these (valid) store paths in ``roots_dir``; returns how many roots were new.
    A path that cannot be rooted is logged and skipped."""
    wanted = sorted(set(paths))
    if not wanted:
        return 0
    roots_dir.mkdir(parents=True, exist_ok=True)
    direct = _direct(roots_dir)
    if not direct:
        roots_dir = Path(os.path.realpath(roots_dir))
    added = 0
    for path in wanted:
        if not storepath.is_store_path(path):
            continue
        link = roots_dir / os.path.basename(path)
        try:
            if os.readlink(link) == path:
                continue
        except OSError:
            pass
        try:
            _symlink(link, path)
            if not direct:
                auto = _auto_root(link)
                auto.parent.mkdir(parents=True, exist_ok=True)
                _symlink(auto, str(link))
        except OSError as exc:
            log.warning("could not add a GC root for %s: %s", path, exc)
            continue
        added += 1
    return added
