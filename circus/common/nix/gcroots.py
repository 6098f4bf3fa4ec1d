"""GC roots: symlinks to store paths in a roots directory; removing one releases it.

Two ways to make them. :func:`add_roots` writes a symlink per path itself: when the
directory lies under ``/nix/var/nix/gcroots`` the symlink alone protects the path;
elsewhere it registers the link as an indirect root exactly as ``nix-store
--add-root --indirect`` does (``gcroots/auto/<nix-base32 SHA-1 of the link path>``
→ link), which needs write access to Nix's state directory. :func:`root_through_nix`
asks Nix (its daemon, for a process that is not root) instead: one store file
referencing every path (``builtins.toFile``), rooted by ``nix-store --add-root
--indirect``, as an evaluation roots its derivations. Nix drops an ``auto`` entry
whose link is gone at its next collection.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from circus.common.nix import base32, process, storepath

log = logging.getLogger(__name__)

NIX_GCROOTS = "/nix/var/nix/gcroots"


def nix_state_dir() -> Path:
    return Path(os.environ.get("NIX_STATE_DIR", "/nix/var/nix"))


def _auto_root(link: Path) -> Path:
    digest = hashlib.sha1(str(link).encode(), usedforsecurity=False).digest()
    return nix_state_dir() / "gcroots" / "auto" / base32.encode(digest)


def _symlink(link: Path, target: str) -> None:
    """Create or replace ``link`` atomically."""
    try:
        # a new link (the usual case) needs no partial link renamed over it
        os.symlink(target, link)
        return
    except FileExistsError:
        pass
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
    auto_dirs: set[Path] = set()
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
                if auto.parent not in auto_dirs:
                    auto.parent.mkdir(parents=True, exist_ok=True)
                    auto_dirs.add(auto.parent)
                _symlink(auto, str(link))
        except OSError as exc:
            log.warning("could not add a GC root for %s: %s", path, exc)
            continue
        added += 1
    return added


def printed_path(stdout: str) -> str | None:
    """The store path ``nix-instantiate --eval --json`` printed last, if it did."""
    try:
        value = json.loads(stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None
    return value if isinstance(value, str) and value.startswith("/") else None


def write_roots_file(paths: Sequence[str], env: Mapping[str, str], timeout: float,
                     scratch: Path) -> str | None:
    """One store file referencing every one of the (valid) ``paths``: a root on it keeps
    them all. None, with a warning, when Nix could not write it."""
    listing = scratch / "roots.json"
    listing.write_text(json.dumps(sorted(set(paths))))
    expr = ("builtins.toFile \"circus-eval-roots\" (builtins.concatStringsSep \"\\n\" "
            f"(map builtins.storePath (builtins.fromJSON (builtins.readFile {listing}))))")
    done = process.run(["nix-instantiate", "--eval", "--json", "--read-write-mode",
                        "-E", expr], env=env, timeout=timeout)
    if done.returncode != 0:
        log.warning("cannot write the GC roots file: %s", done.stderr.strip()[-500:])
        return None
    return printed_path(done.stdout)


def add_indirect_root(link: Path, store_path: str, env: Mapping[str, str],
                      timeout: float = 120) -> bool:
    """``link`` -> ``store_path``, registered by Nix as an indirect GC root; False, with
    a warning, when Nix refused."""
    link.parent.mkdir(parents=True, exist_ok=True)
    done = process.run(["nix-store", "--add-root", str(link), "--indirect", "--realise",
                        store_path], env=env, timeout=timeout)
    if done.returncode != 0:
        log.warning("cannot register GC root %s: %s", link, done.stderr.strip()[-500:])
        return False
    return True


def root_through_nix(roots_dir: Path, paths: Sequence[str], env: Mapping[str, str],
                     timeout: float = 600) -> bool:
    """Root the (valid) store ``paths`` in ``roots_dir`` with one indirect root made by
    Nix (two Nix processes, whatever the number of paths); False, with a warning, when
    Nix failed. The link is named after the roots file: another call adds its own."""
    if not paths:
        return True
    with tempfile.TemporaryDirectory(prefix="circus-roots-") as scratch:
        roots_file = write_roots_file(paths, env, timeout, Path(scratch))
    if roots_file is None:
        return False
    return add_indirect_root(roots_dir / os.path.basename(roots_file), roots_file, env)
