"""Finishing builds: statuses, products, metrics, aggregates, the cache hand-off.

This layer knows nothing about *how* a step was built (local ``nix-store``,
SSH, an agent): it turns finished steps into finished builds. A build finishes
when its top-level step is done; an aggregate also waits for its constituents.
Every update is conditional on the build still being unfinished, so a build is
never finished twice.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import delete, insert, text
from sqlalchemy.orm import Session

from circus.cache.publish import UploadError, publish_outputs
from circus.common.config import Settings
from circus.common.enums import BuildStatus
from circus.common.models import BuildMetric, BuildProduct
from circus.common.statussql import UNFINISHED
from circus.projects.channels import advance_channels_of_builds
from circus.queue_runner.builds.products import OutputResult

log = logging.getLogger(__name__)



@dataclass
class BuildFinal:
    build_id: int
    status: BuildStatus
    error_message: str | None = None
    machine: str | None = None
    started_at: datetime | None = None
    result: OutputResult | None = None


@dataclass
class BuildsReport:
    #: (build id, status) of every build this call finished
    finished: list[tuple[int, BuildStatus]] = field(default_factory=list)
    #: output paths of builds that succeeded (GC roots, closure sizes)
    succeeded: dict[int, list[str]] = field(default_factory=dict)

    def merge(self, other: BuildsReport) -> None:
        self.finished.extend(other.finished)
        self.succeeded.update(other.succeeded)


def settle_builds_of_steps(session: Session, settings: Settings, step_ids: Iterable[int],
                           results: Mapping[str, OutputResult], *, advance: bool = True
                           ) -> BuildsReport:
    """Finish the unfinished builds whose top-level step is one of ``step_ids`` (all done).

    ``results`` maps drv paths of steps that produced outputs to what was read
    from them (products, metrics).
    """
    ids = sorted(set(step_ids))
    if not ids:
        return BuildsReport()
    rows = session.execute(text(f"""
        SELECT b.id, b.is_aggregate, s.status, s.error_message, s.machine, s.started_at,
               s.drv_path
        FROM build_steps bs
        JOIN builds b ON b.id = bs.build_id
        JOIN steps s ON s.id = bs.step_id
        WHERE bs.step_id = ANY(:ids) AND bs.is_toplevel AND b.status IN {UNFINISHED}
          AND s.state = 'done'
        ORDER BY b.id
        FOR UPDATE OF b
    """), {"ids": ids}).all()
    finals: list[BuildFinal] = []
    aggregates: list[int] = []
    for build_id, is_aggregate, status_code, error, machine, started_at, drv_path in rows:
        status = BuildStatus(status_code)
        if is_aggregate and status is BuildStatus.succeeded:
            aggregates.append(build_id)
            continue
        finals.append(BuildFinal(build_id, status, error, machine, started_at,
                                 results.get(drv_path)))
    report = finish_builds(session, settings, finals, advance=False)
    if aggregates:
        report.merge(finish_aggregates(session, settings, aggregates, advance=False))
    if advance:
        advance_channels_of_builds(session, [build_id for build_id, _ in report.finished])
    return report


def finish_builds(session: Session, settings: Settings | None, finals: list[BuildFinal],
                  *, advance: bool = True) -> BuildsReport:
    """Record final statuses (only for builds still unfinished) and their results.

    ``settings`` may be None only when no build can succeed here (cancellation).
    With ``advance``, automatic channels then follow (:func:`advance_channels_of_builds`);
    a caller that finishes more builds in the same transaction passes False and
    advances once at the end, so channel rows are always locked after build rows.
    """
    report = BuildsReport()
    if not finals:
        return report
    finals = sorted(finals, key=lambda f: f.build_id)
    succeeded = [f for f in finals if f.status is BuildStatus.succeeded]
    if succeeded:
        if settings is None:
            raise ValueError("finishing a succeeded build needs the settings")
        if publishes_inline(settings):
            _publish(session, settings, succeeded)
    # one statement: the update, the outputs (GC roots) and whether an aggregate waits
    updated = session.execute(text(f"""
        UPDATE builds AS b SET
            status = v.status,
            error_message = v.error_message,
            machine = COALESCE(v.machine, b.machine),
            started_at = COALESCE(b.started_at, v.started_at, now()),
            completed_at = now(),
            notification_pending_since = now()
        FROM unnest(CAST(:ids AS bigint[]), CAST(:statuses AS smallint[]),
                    CAST(:errors AS text[]), CAST(:machines AS text[]),
                    CAST(:started AS timestamptz[]))
             AS v(id, status, error_message, machine, started_at)
        WHERE b.id = v.id AND b.status IN {UNFINISHED}
        RETURNING b.id, b.status,
            (SELECT array_agg(o.path ORDER BY o.name) FROM build_outputs o
             WHERE o.build_id = b.id) AS outputs,
            EXISTS (SELECT 1 FROM build_constituents c WHERE c.constituent_id = b.id)
                AS in_aggregate
    """), {
        "ids": [f.build_id for f in finals],
        "statuses": [int(f.status) for f in finals],
        "errors": [f.error_message for f in finals],
        "machines": [f.machine for f in finals],
        "started": [f.started_at for f in finals],
    }).all()
    done = {row.id: BuildStatus(row.status) for row in updated}
    by_id = {f.build_id: f for f in finals}
    _record_results(session, [by_id[i] for i in sorted(done)])
    for row in sorted(updated, key=lambda r: r.id):
        report.finished.append((row.id, BuildStatus(row.status)))
        if row.status == BuildStatus.succeeded:
            report.succeeded[row.id] = list(row.outputs or [])
    if report.succeeded and settings is not None:   # (None raised above)
        _mark_postprocessing_pending(session, settings, sorted(report.succeeded))
    members = sorted(row.id for row in updated if row.in_aggregate)
    if members:
        candidates = session.execute(text("""
            SELECT DISTINCT aggregate_id FROM build_constituents
            WHERE constituent_id = ANY(:ids)
        """), {"ids": members}).scalars().all()
        report.merge(finish_aggregates(session, settings, list(candidates), advance=False))
    if advance:
        # a finished build can make an evaluation good: automatic channels follow it
        advance_channels_of_builds(session, [build_id for build_id, _ in report.finished])
    return report


def _mark_postprocessing_pending(session: Session, settings: Settings, build_ids: list[int]
                                 ) -> None:
    """The durable side of ``postprocess.PostProcessor``: in the transaction that finishes
    the builds, so no succeeded build can miss its post-processing; the in-process try
    comes first, a retry only ``postprocess_retry_secs`` later."""
    session.execute(text("""
        INSERT INTO pending_postprocessing (build_id, not_before)
        SELECT id, now() + make_interval(secs => :delay)
        FROM unnest(CAST(:ids AS bigint[])) AS id
        ON CONFLICT (build_id) DO UPDATE SET
            since = now(), attempts = 0, not_before = EXCLUDED.not_before, last_error = NULL
    """), {"ids": build_ids, "delay": float(settings.queue_runner.postprocess_retry_secs)})


def publishes_inline(settings: Settings) -> bool:
    """Whether publishing decides the build's status (so it must happen before it finishes).

    Only a required S3 upload can fail a build. Otherwise the cache is filled by
    the post-processor a moment after the build finished: packing and signing
    every output in the finishing transaction tripled the time of a DAG of
    trivial derivations (bench/build_overhead.py: 3.3x against 1.3x).
    """
    upload = settings.cache_upload
    return upload.enabled and upload.fail_build_on_upload_error


def _publish(session: Session, settings: Settings, finals: list[BuildFinal]) -> None:
    """Hand the outputs to the binary cache before the builds count as finished.

    One savepoint for the whole batch; when something goes wrong, each build is
    published again in its own savepoint so one failure touches only its build.
    """
    try:
        with session.begin_nested():
            for final in finals:
                publish_outputs(session, settings, final.build_id)
        return
    except Exception:
        if len(finals) == 1:
            _publish_one(session, settings, finals[0])
            return
    for final in finals:
        _publish_one(session, settings, final)


def _publish_one(session: Session, settings: Settings, final: BuildFinal) -> None:
    try:
        with session.begin_nested():
            publish_outputs(session, settings, final.build_id)
    except UploadError as exc:
        if settings.cache_upload.fail_build_on_upload_error:
            final.status = BuildStatus.aborted
            final.error_message = f"uploading the outputs to the binary cache failed: {exc}"
        else:
            log.warning("build %d: cache upload failed (build still succeeds): %s",
                        final.build_id, exc)
    except Exception as exc:
        # a bug in post-processing must not leave the build running forever
        log.exception("build %d: publishing its outputs failed", final.build_id)
        final.status = BuildStatus.aborted
        final.error_message = f"publishing the outputs failed: {exc}"


def _record_results(session: Session, finals: list[BuildFinal]) -> None:
    # restarts delete earlier results, so only builds with something to record matter
    with_results = [f for f in finals
                    if f.result is not None and (f.result.products or f.result.metrics)]
    if not with_results:
        return
    ids = [f.build_id for f in with_results]
    session.execute(delete(BuildProduct).where(BuildProduct.build_id.in_(ids)))
    session.execute(delete(BuildMetric).where(BuildMetric.build_id.in_(ids)))
    products = [
        {"build_id": f.build_id, "type": p.type, "subtype": p.subtype, "name": p.name,
         "path": p.path, "default_path": p.default_path, "sha256": p.sha256,
         "file_size": p.file_size, "content_type": p.content_type,
         "is_directory": p.is_directory}
        for f in with_results if f.result is not None for p in f.result.products
    ]
    metrics = [
        {"build_id": f.build_id, "name": m.name, "value": m.value, "unit": m.unit}
        for f in with_results if f.result is not None for m in f.result.metrics
    ]
    if products:
        session.execute(insert(BuildProduct), products)
    if metrics:
        session.execute(insert(BuildMetric), metrics)


def finish_aggregates(session: Session, settings: Settings | None,
                      aggregate_ids: Iterable[int], *, advance: bool = True) -> BuildsReport:
    """Finish aggregates whose own derivation and constituents are all finished.

    The aggregate's own part is its top-level step of the current generation
    (build_steps created at or after ``stepped_at``), or succeeded when it had
    no step because its outputs were already valid.
    """
    ids = sorted(set(aggregate_ids))
    if not ids:
        return BuildsReport()
    aggregates = session.execute(text(f"""
        SELECT id FROM builds
        WHERE id = ANY(:ids) AND is_aggregate AND status IN {UNFINISHED} AND stepped_at IS NOT NULL
        ORDER BY id FOR UPDATE
    """), {"ids": ids}).scalars().all()
    if not aggregates:
        return BuildsReport()
    own = {
        row.build_id: row for row in session.execute(text("""
            SELECT DISTINCT ON (bs.build_id) bs.build_id, s.state, s.status, s.machine,
                   s.started_at, s.error_message
            FROM build_steps bs
            JOIN builds b ON b.id = bs.build_id
            JOIN steps s ON s.id = bs.step_id
            WHERE bs.build_id = ANY(:ids) AND bs.is_toplevel AND bs.created_at >= b.stepped_at
            ORDER BY bs.build_id, bs.step_nr DESC
        """), {"ids": list(aggregates)}).all()
    }
    constituents: dict[int, list[tuple[str, BuildStatus]]] = {}
    for aggregate_id, job_name, status in session.execute(text("""
        SELECT c.aggregate_id, cb.job_name, cb.status
        FROM build_constituents c JOIN builds cb ON cb.id = c.constituent_id
        WHERE c.aggregate_id = ANY(:ids)
    """), {"ids": list(aggregates)}).all():
        constituents.setdefault(aggregate_id, []).append((job_name, BuildStatus(status)))
    finals: list[BuildFinal] = []
    for aggregate_id in aggregates:
        row = own.get(aggregate_id)
        if row is not None and row.state != "done":
            continue
        own_status = BuildStatus(row.status) if row is not None else BuildStatus.succeeded
        machine = row.machine if row is not None else None
        started = row.started_at if row is not None else None
        if own_status is not BuildStatus.succeeded:
            finals.append(BuildFinal(aggregate_id, own_status,
                                     row.error_message if row is not None else None,
                                     machine, started))
            continue
        members = constituents.get(aggregate_id, [])
        if any(not status.is_finished for _, status in members):
            continue
        failed = sorted(name for name, status in members if not status.is_success)
        if failed:
            finals.append(BuildFinal(aggregate_id, BuildStatus.dependency_failed,
                                     "constituents failed: " + ", ".join(failed), machine,
                                     started))
        else:
            finals.append(BuildFinal(aggregate_id, BuildStatus.succeeded, None, machine,
                                     started))
    return finish_builds(session, settings, finals, advance=advance)
