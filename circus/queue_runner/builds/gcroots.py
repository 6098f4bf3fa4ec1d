"""GC roots for build outputs worth keeping.

Kept: outputs of succeeded builds (``succeeded``, ``failed_with_output``) that
belong to one of the newest ``keep_nr`` evaluations of their jobset (of those,
evaluations older than ``gc.max_age_days`` only when they are the newest), to a
channel's evaluation, or are marked ``keep``. Each is a symlink
``<gc.gc_roots_dir>/<store path basename>``. When the directory lies under
``/nix/var/nix/gcroots`` the symlink alone protects the path; elsewhere each
link is registered as an indirect root, exactly as ``nix-store --add-root
--indirect`` does it (``gcroots/auto/<nix-base32 SHA-1 of the link path>`` →
link), without starting a Nix process per root.
New outputs get their root right after the build finishes; a periodic sync
removes roots nothing wants any more. Circus never runs the garbage collector.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.orm import Session

from circus.common.config import Settings
from circus.common.nix import store
from circus.common.statussql import EVALUATION_UNSUCCESSFUL, WITH_OUTPUTS

log = logging.getLogger(__name__)

NIX_GCROOTS = "/nix/var/nix/gcroots"
STORE_DIR = "/nix/store/"
#: pg_try_advisory_xact_lock key of the GC root sync ("CQRG")
GC_LOCK = 0x43515247


_NIX32 = "0123456789abcdfghijklmnpqrsvwxyz"


def nix_base32(data: bytes) -> str:
    """Nix's base-32 (its own alphabet, least significant bits first)."""
    length = (len(data) * 8 - 1) // 5 + 1
    chars = []
    for n in range(length - 1, -1, -1):
        byte, bit = divmod(n * 5, 8)
        value = data[byte] >> bit
        if byte + 1 < len(data):
            value |= data[byte + 1] << (8 - bit)
        chars.append(_NIX32[value & 0x1F])
    return "".join(chars)


def nix_state_dir() -> Path:
    return Path(os.environ.get("NIX_STATE_DIR", "/nix/var/nix"))


def _auto_root(link: Path) -> Path:
    digest = hashlib.sha1(str(link).encode(), usedforsecurity=False).digest()
    return nix_state_dir() / "gcroots" / "auto" / nix_base32(digest)


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


def add_roots(settings: Settings, paths: Iterable[str]) -> int:
    """Create roots for these (valid) store paths; returns how many were new."""
    roots_dir = Path(settings.gc.gc_roots_dir)
    roots_dir.mkdir(parents=True, exist_ok=True)
    direct = _direct(roots_dir)
    if not direct:
        roots_dir = Path(os.path.realpath(roots_dir))
    added = 0
    for path in sorted(set(paths)):
        if not path.startswith(STORE_DIR) or "/" in path[len(STORE_DIR):]:
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


def remove_roots(settings: Settings, paths: Iterable[str]) -> int:
    roots_dir = Path(settings.gc.gc_roots_dir)
    removed = 0
    for path in set(paths):
        link = roots_dir / os.path.basename(path)
        try:
            if os.readlink(link) == path:
                link.unlink()
                removed += 1
        except OSError:
            pass
    return removed


def existing_roots(settings: Settings) -> dict[str, Path]:
    """store path -> link, for the symlinks in the roots directory pointing into the store."""
    roots_dir = Path(settings.gc.gc_roots_dir)
    found: dict[str, Path] = {}
    if not roots_dir.is_dir():
        return found
    for entry in roots_dir.iterdir():
        try:
            target = os.readlink(entry)
        except OSError:
            continue
        if target.startswith(STORE_DIR):
            found[target] = entry
    return found


def wanted_roots(session: Session, max_age_days: int = 0) -> set[str]:
    """Outputs to keep rooted. With ``max_age_days`` > 0 an evaluation older than that
    leaves the ``keep_nr`` window, except each jobset's newest one (a jobset that has
    not changed for months still has its outputs in the cache)."""
    rows = session.execute(text(f"""
        WITH ranked AS (
            SELECT e.id, e.jobset_id, e.created_at,
                   row_number() OVER (PARTITION BY e.jobset_id ORDER BY e.id DESC) AS rn
            FROM evaluations e
            WHERE e.status NOT IN {EVALUATION_UNSUCCESSFUL}
        ),
        kept_evals AS (
            SELECT r.id FROM ranked r JOIN jobsets j ON j.id = r.jobset_id
            WHERE r.rn <= j.keep_nr AND (r.rn = 1 OR :max_age_days = 0
                  OR r.created_at >= now() - make_interval(days => :max_age_days))
            UNION
            SELECT evaluation_id FROM channels WHERE evaluation_id IS NOT NULL
        ),
        kept_builds AS (
            SELECT id FROM builds WHERE keep
            UNION
            SELECT eb.build_id FROM evaluation_builds eb
            WHERE eb.evaluation_id IN (SELECT id FROM kept_evals)
            UNION
            SELECT b.id FROM builds b WHERE b.evaluation_id IN (SELECT id FROM kept_evals)
        )
        SELECT DISTINCT o.path FROM build_outputs o
        JOIN builds b ON b.id = o.build_id
        WHERE b.status IN {WITH_OUTPUTS} AND b.id IN (SELECT id FROM kept_builds)
    """), {"max_age_days": max_age_days}).scalars().all()
    return set(rows)


@dataclass
class SyncReport:
    added: int = 0
    removed: int = 0


def sync_roots(session: Session, settings: Settings) -> SyncReport:
    """Make the roots directory match :func:`wanted_roots` (one runner at a time)."""
    report = SyncReport()
    if not settings.gc.enabled:
        return report
    got = session.execute(text("SELECT pg_try_advisory_xact_lock(:key)"),
                          {"key": GC_LOCK}).scalar_one()
    if not got:
        return report
    wanted = wanted_roots(session, settings.gc.max_age_days)
    existing = existing_roots(settings)
    stale = [path for path in existing if path not in wanted]
    report.removed = remove_roots(settings, stale)
    missing = sorted(wanted - set(existing))
    if missing:
        try:
            invalid = set(store.invalid_paths(missing, settings.nix_environ()))
        except store.StoreError:
            log.warning("could not check which outputs are valid", exc_info=True)
            invalid = set(missing)
        report.added = add_roots(settings, [p for p in missing if p not in invalid])
    if report.added or report.removed:
        log.info("GC roots: %d added, %d removed", report.added, report.removed)
    return report
