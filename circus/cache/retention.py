"""Removing cache entries of paths nothing keeps alive any more.

A path stays in the cache while it is in the closure of a *retained* build:
kept builds, unfinished builds, builds of unfinished evaluations, of each
channel's current evaluation, and of the newest ``keep_nr`` completed
evaluations of their jobset (failed evaluations do not count, as in Hydra).
The closure is walked in SQL over ``narinfo_cache.references``. The rule is
the one the queue runner uses for GC roots, so the cache never announces a
path the store may have collected, nor drops one a channel still points to.

Retention holds the cache lock exclusively (publishers hold it shared), so a
file is never deleted while a concurrent publish is about to record it; rows
younger than ``cache.retention_grace_secs`` are never touched.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from circus.cache import records
from circus.cache.files import NAR_URL, LocalFiles
from circus.cache.s3 import S3Error, S3Store
from circus.common.config import Settings
from circus.common.models import NarInfo as NarInfoRow
from circus.common.statussql import EVALUATION_ACTIVE, EVALUATION_COMPLETED, UNFINISHED

log = logging.getLogger(__name__)

_DELETE_UNROOTED = text(f"""
WITH RECURSIVE
ranked AS (
    SELECT e.id, j.keep_nr,
           row_number() OVER (PARTITION BY e.jobset_id ORDER BY e.id DESC) AS rn
    FROM evaluations e JOIN jobsets j ON j.id = e.jobset_id
    WHERE e.status = {EVALUATION_COMPLETED}
),
root_evaluations AS (
    SELECT id FROM ranked WHERE rn <= keep_nr
    UNION SELECT evaluation_id FROM channels WHERE evaluation_id IS NOT NULL
    UNION SELECT id FROM evaluations WHERE status IN {EVALUATION_ACTIVE}
),
root_builds AS (
    SELECT id FROM builds WHERE keep OR status IN {UNFINISHED}
    UNION SELECT eb.build_id FROM evaluation_builds eb
          JOIN root_evaluations r ON r.id = eb.evaluation_id
    UNION SELECT b.id FROM builds b JOIN root_evaluations r ON r.id = b.evaluation_id
),
live(path) AS (
    SELECT path FROM (
        SELECT o.path FROM build_outputs o JOIN root_builds r ON r.id = o.build_id
        UNION SELECT n.store_path FROM narinfo_cache n JOIN root_builds r ON r.id = n.build_id
    ) AS seeds
    UNION
    SELECT ref FROM live
    JOIN narinfo_cache n ON n.store_path = live.path
    CROSS JOIN LATERAL unnest(n."references") AS ref
)
DELETE FROM narinfo_cache n
WHERE n.created_at < now() - make_interval(secs => :grace)
  AND NOT EXISTS (SELECT 1 FROM live WHERE live.path = n.store_path)
RETURNING n.store_path, n.hash_part, n.url, n.storage
""")


@dataclass
class RetentionResult:
    removed_paths: list[str] = field(default_factory=list)
    removed_files: int = 0
    removed_objects: int = 0
    orphan_files: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"removed_paths": len(self.removed_paths), "removed_files": self.removed_files,
                "removed_objects": self.removed_objects, "orphan_files": self.orphan_files}


def remove_unrooted(session: Session, settings: Settings) -> RetentionResult:
    """Delete rows, files and S3 objects of unrooted paths. The caller commits."""
    result = RetentionResult()
    if not settings.gc.enabled:
        return result
    grace = settings.cache.retention_grace_secs
    records.lock_exclusive(session)
    deleted = session.execute(_DELETE_UNROOTED, {"grace": grace}).all()
    result.removed_paths = sorted(row.store_path for row in deleted)
    urls = {row.url for row in deleted}
    still_used = set(session.scalars(select(NarInfoRow.url).where(NarInfoRow.url.in_(urls))))
    unused = urls - still_used
    files = LocalFiles(settings.cache.cache_dir)
    for row in deleted:
        if row.url in unused and row.storage == "local" and files.remove(row.url):
            result.removed_files += 1
    s3_rows = [row for row in deleted if row.storage == "s3"]
    if s3_rows:
        keys = [f"{row.hash_part}.narinfo" for row in s3_rows]
        keys += sorted({row.url for row in s3_rows if row.url in unused})
        try:
            S3Store(settings.cache_upload).delete(keys)
            result.removed_objects = len(keys)
        except (*S3Error, ValueError) as exc:  # type: ignore[misc]
            # the rows are gone either way; leftover objects only cost storage
            log.warning("cache retention: cannot delete %d S3 objects: %s", len(keys), exc)
    result.orphan_files = _remove_orphan_files(session, files, grace)
    session.flush()
    if result.removed_paths:
        log.info("cache retention: removed %d paths, %d files, %d S3 objects",
                 len(result.removed_paths), result.removed_files, result.removed_objects)
    return result


def _remove_orphan_files(session: Session, files: LocalFiles, grace: int) -> int:
    """Files no row names (a publish that crashed or rolled back), older than the grace."""
    nar_dir = files.root / "nar"
    if not nar_dir.is_dir():
        return 0
    cutoff = time.time() - grace
    candidates: dict[str, Path] = {}
    removed = 0
    for entry in nar_dir.iterdir():
        try:
            if entry.lstat().st_mtime >= cutoff:
                continue
        except FileNotFoundError:
            continue
        url = f"nar/{entry.name}"
        if entry.name.startswith(".pack-"):
            entry.unlink(missing_ok=True)
            removed += 1
        elif NAR_URL.fullmatch(url):
            candidates[url] = entry
    names = list(candidates)
    for start in range(0, len(names), 1000):
        batch = names[start:start + 1000]
        used = set(session.scalars(select(NarInfoRow.url).where(NarInfoRow.url.in_(batch))))
        for url in batch:
            if url not in used:
                candidates[url].unlink(missing_ok=True)
                removed += 1
    return removed
