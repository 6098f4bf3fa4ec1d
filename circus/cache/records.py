"""``narinfo_cache`` rows ↔ :class:`circus.common.nix.narinfo.NarInfo`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from circus.common.models import NarInfo as NarInfoRow
from circus.common.models import NarInfoProject
from circus.common.nix import storepath
from circus.common.nix.narinfo import NarInfo

#: held shared by publishers and exclusively by retention, so retention never
#: deletes a file that a concurrent publish is about to record
CACHE_LOCK_KEY = 0x63697263_75736361  # "circusca"

#: the channel narinfo_cache's triggers NOTIFY with the hash parts a statement inserted
#: (``+h1,h2``), changed (``~...``) or deleted (``-...``), or ``*`` after a TRUNCATE
#: (migration 581d89a96422); servers keep their index of recorded paths current by it
NARINFO_CHANNEL = "circus_narinfo"

COLUMNS = ("store_path", "url", "compression", "nar_hash", "nar_size", "references",
           "file_hash", "file_size", "deriver", "sig", "ca")


def from_row(row: Mapping[Any, Any]) -> NarInfo:
    compression = row["compression"]
    return NarInfo(
        store_path=row["store_path"],
        url=row["url"],
        compression=getattr(compression, "value", compression),
        nar_hash=row["nar_hash"],
        nar_size=row["nar_size"],
        references=tuple(row["references"] or ()),
        file_hash=row["file_hash"],
        file_size=row["file_size"],
        deriver=row["deriver"],
        sigs=tuple((row["sig"] or "").split()),
        ca=row["ca"],
    )


def to_values(info: NarInfo, *, storage: str, build_id: int | None,
              project_id: int | None) -> dict[str, Any]:
    return {
        "store_path": info.store_path,
        "hash_part": storepath.hash_part(info.store_path),
        "nar_hash": info.nar_hash,
        "nar_size": info.nar_size,
        "file_hash": info.file_hash,
        "file_size": info.file_size,
        "compression": info.compression,
        "url": info.url,
        "storage": storage,
        "deriver": info.deriver,
        "references": list(info.references),
        "sig": " ".join(info.sigs) or None,
        "ca": info.ca,
        "build_id": build_id,
        "project_id": project_id,
    }


def insert_rows(session: Session, values: list[dict[str, Any]]) -> None:
    """Record rows; a path recorded concurrently by someone else is left as it is."""
    if values:
        # executemany form: one compiled statement, batched by SQLAlchemy
        # ("insertmanyvalues"); a multi-row VALUES is compiled anew for every
        # row count, which cost the queue runner ~1 ms of CPU per path
        session.execute(insert(NarInfoRow).on_conflict_do_nothing(), values)


def link_projects(session: Session, paths: list[str], project_id: int) -> None:
    if paths:
        # only paths that are recorded (a failed pack leaves a hole, never a dangling link)
        recorded = select(NarInfoRow.store_path, text(str(int(project_id)))).where(
            NarInfoRow.store_path.in_(paths))
        session.execute(insert(NarInfoProject).from_select(
            ["store_path", "project_id"], recorded).on_conflict_do_nothing())


def serve_to_all(session: Session, paths: list[str]) -> None:
    """Clear ``worker_only`` of ``paths``: a build's outputs closure holds them."""
    if paths:
        session.execute(update(NarInfoRow).where(NarInfoRow.store_path.in_(paths),
                                                 NarInfoRow.worker_only)
                        .values(worker_only=False))


def lock_shared(session: Session) -> None:
    session.execute(text("SELECT pg_advisory_xact_lock_shared(:key)"), {"key": CACHE_LOCK_KEY})


def lock_exclusive(session: Session) -> None:
    session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": CACHE_LOCK_KEY})
