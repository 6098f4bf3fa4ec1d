"""GC roots for build outputs worth keeping.

Kept: outputs of succeeded builds (``succeeded``, ``failed_with_output``) that
belong to one of the newest ``keep_nr`` evaluations of their jobset (of those,
evaluations older than ``gc.max_age_days`` only when they are the newest), to a
channel's evaluation, or are marked ``keep``. Each is a symlink
``<gc.gc_roots_dir>/<store path basename>`` (:mod:`circus.common.nix.gcroots`:
an indirect root, registered without starting a Nix process per root).
New outputs get their root right after the build finishes; a periodic sync
removes roots nothing wants any more. Circus never runs the garbage collector.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.orm import Session

from circus.common.config import Settings
from circus.common.nix import gcroots as nix_gcroots
from circus.common.nix import store
from circus.common.statussql import EVALUATION_UNSUCCESSFUL, WITH_OUTPUTS

log = logging.getLogger(__name__)

STORE_DIR = "/nix/store/"
#: pg_try_advisory_xact_lock key of the GC root sync ("CQRG")
GC_LOCK = 0x43515247


def add_roots(settings: Settings, paths: Iterable[str]) -> int:
    """Create roots for these (valid) store paths; returns how many were new."""
    return nix_gcroots.add_roots(Path(settings.gc.gc_roots_dir), paths)


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
