"""Turning pending builds into steps (the dispatcher's batch).

One batch, one transaction:

1. take unstepped pending builds (``FOR UPDATE SKIP LOCKED``) under a
   transaction-level advisory lock, so two dispatchers never interleave;
2. ask Nix once which derivations of their closures must be built
   (``nix-store -r --dry-run``: not valid and not substitutable);
3. walk the closures with the parsed-derivation cache; a build whose closure
   holds a derivation of the failed-path cache fails at once
   (``cached_failure``, or ``dependency_failed`` for a dependency); a build with
   nothing to build finishes at once;
4. insert steps (``ON CONFLICT DO NOTHING`` against the partial unique index,
   then re-select the active ones), edges and ``build_steps`` in bulk;
5. steps whose dependencies all succeeded become ``queued``;
6. lock the reused active steps so they cannot finish before the new edges are
   committed, and apply the consequences of those that finished meanwhile
   (:func:`_hold_reused_steps`); the caller publishes wake-ups after commit.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field

from sqlalchemy import text
from sqlalchemy.orm import Session

from circus.common.config import Settings
from circus.common.enums import BuildStatus
from circus.common.nix import store
from circus.common.nix.derivation import DerivationParseError
from circus.common.statussql import (
    PENDING,
    RUNNING,
    SUCCEEDED,
    dependencies_succeeded,
    step_succeeded,
)
from circus.projects.channels import advance_channels_of_builds
from circus.queue_runner.builds.products import read_output_result
from circus.queue_runner.builds.results import (
    BuildFinal,
    BuildsReport,
    finish_aggregates,
    finish_builds,
)
from circus.queue_runner.derivations import DrvCache, DrvInfo
from circus.queue_runner.routing.capabilities import queue_class_name
from circus.queue_runner.steps.outcomes import DoneStep, after_steps_done, done_steps

log = logging.getLogger(__name__)

#: pg_advisory_xact_lock key of the dispatcher ("CQRD")
DISPATCH_LOCK = 0x43515244


@dataclass
class StepReport:
    builds: int = 0
    new_steps: int = 0
    queued: Counter[str] = field(default_factory=Counter)
    new_classes: list[str] = field(default_factory=list)
    finished: BuildsReport = field(default_factory=BuildsReport)


@dataclass
class _Build:
    id: int
    drv_path: str
    priority: int
    jobset_id: int | None
    timeout: int | None
    max_silent: int | None
    is_aggregate: bool


@dataclass
class _Triage:
    """Where each build of a batch goes: finished at once, or on to steps."""

    #: builds that end here (aborted, cached failures, nothing to build)
    finals: list[BuildFinal] = field(default_factory=list)
    #: aggregates with nothing to build: settled from their constituents
    aggregates_done: list[int] = field(default_factory=list)
    #: builds that need steps, with the derivations each must build (root first)
    live: list[_Build] = field(default_factory=list)
    closures: dict[int, list[str]] = field(default_factory=dict)
    #: build -> the derivation of its closure found in the failed-path cache
    cached_for: dict[int, str] = field(default_factory=dict)
    cached: dict[str, BuildStatus] = field(default_factory=dict)

    def abort(self, build: _Build, message: str) -> None:
        self.finals.append(BuildFinal(build.id, BuildStatus.aborted, message))

    def settled(self) -> set[int]:
        return {f.build_id for f in self.finals}

    def aborted(self) -> set[int]:
        return {f.build_id for f in self.finals if f.status is BuildStatus.aborted}


def step_builds(session: Session, settings: Settings, cache: DrvCache, limit: int = 2000
                ) -> StepReport:
    """Step up to ``limit`` unstepped builds (call in a transaction; commit after).

    The numbered steps of the module docstring: :func:`_take_unstepped` (1),
    :func:`_triage` (2, 3), :func:`_create_steps` (4 to 6), then the builds are
    marked stepped and those that ended here are finished.
    """
    builds = _take_unstepped(session, limit)
    report = StepReport(builds=len(builds))
    if not builds:
        return report
    triage = _triage(session, settings, cache, builds)
    aborted = triage.aborted()
    _ensure_outputs(session, cache, [b for b in builds if b.id not in aborted])
    if triage.cached_for:
        _record_cached_failures(session, cache, builds, triage.cached_for, triage.cached)
    if triage.live:
        _create_steps(session, settings, cache, triage.live, triage.closures, report)
    _mark_stepped(session, builds)
    report.finished.merge(finish_builds(session, settings, triage.finals, advance=False))
    if triage.aggregates_done:
        report.finished.merge(finish_aggregates(session, settings, triage.aggregates_done,
                                                advance=False))
    advance_channels_of_builds(session, [build_id for build_id, _ in report.finished.finished])
    return report


def _take_unstepped(session: Session, limit: int) -> list[_Build]:
    """Lock up to ``limit`` pending builds not stepped yet, best first, under the
    dispatcher's advisory lock (two dispatchers never interleave)."""
    session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": DISPATCH_LOCK})
    return [_Build(*row) for row in session.execute(text(f"""
        SELECT id, drv_path, priority, jobset_id, timeout, max_silent, is_aggregate
        FROM builds WHERE status = {PENDING} AND stepped_at IS NULL
        ORDER BY priority DESC, id LIMIT :limit
        FOR UPDATE SKIP LOCKED
    """), {"limit": limit}).all()]


def _triage(session: Session, settings: Settings, cache: DrvCache, builds: list[_Build]
            ) -> _Triage:
    """Read each build's derivation and closure and decide where it goes.

    Unreadable derivations abort their build; one Nix call says what must be
    built; then each build with something to build either hits the failed-path
    cache or goes on to steps, and each without finishes at once.
    """
    triage = _Triage()
    readable: list[_Build] = []
    for build in builds:
        problem = _drv_problem(cache, build.drv_path)
        if problem:
            triage.abort(build, problem)
        else:
            readable.append(build)
    to_build = _to_build(readable, settings.nix_environ(), triage.finals)
    settled = triage.settled()
    for build in readable:
        if build.id in settled:
            continue
        try:
            triage.closures[build.id] = _closure(cache, build.drv_path, to_build)
        except (OSError, DerivationParseError) as exc:
            triage.abort(build, f"cannot read a derivation of the closure: {exc}")
    triage.cached = _cached_failures(session, settings,
                                     {d for c in triage.closures.values() for d in c})
    for build in readable:
        closure = triage.closures.get(build.id)
        if closure is None:
            continue
        if not closure:
            _finish_built(cache, build, triage)
        elif not _hits_cached_failure(build, closure, triage):
            triage.live.append(build)
    return triage


def _finish_built(cache: DrvCache, build: _Build, triage: _Triage) -> None:
    """A build with nothing to build: its outputs are valid (or substitutable)."""
    result = read_output_result(cache.get(build.drv_path).output_paths)
    if result.failed_marker:
        triage.finals.append(BuildFinal(build.id, BuildStatus.failed_with_output,
                                        "outputs already valid; nix-support/failed exists",
                                        result=result))
    elif build.is_aggregate:
        triage.aggregates_done.append(build.id)
    else:
        triage.finals.append(BuildFinal(build.id, BuildStatus.succeeded, result=result))


def _hits_cached_failure(build: _Build, closure: list[str], triage: _Triage) -> bool:
    """Fail ``build`` when a derivation of its closure is in the failed-path cache."""
    hit = next((d for d in closure if d in triage.cached), None)
    if hit is None:
        return False
    triage.cached_for[build.id] = hit
    if hit == build.drv_path:
        triage.finals.append(BuildFinal(
            build.id, BuildStatus.cached_failure,
            f"{hit} failed recently ({triage.cached[hit].name}); restart to build again"))
    else:
        triage.finals.append(BuildFinal(build.id, BuildStatus.dependency_failed,
                                        f"dependency {hit} is a cached failure"))
    return True


def _mark_stepped(session: Session, builds: list[_Build]) -> None:
    # stepped = queued: the notification collector reports it (and anything later)
    session.execute(text("""
        UPDATE builds SET stepped_at = now(), notification_pending_since = now()
        WHERE id = ANY(:ids)
    """), {"ids": [b.id for b in builds]})


def _drv_problem(cache: DrvCache, drv_path: str) -> str | None:
    if not os.path.exists(drv_path):
        return f"derivation {drv_path} is not in the store"
    try:
        cache.get(drv_path)
    except (OSError, DerivationParseError) as exc:
        return f"cannot read derivation {drv_path}: {exc}"
    return None


def _to_build(builds: list[_Build], env: dict[str, str], finals: list[BuildFinal]) -> set[str]:
    if not builds:
        return set()
    try:
        return store.missing([b.drv_path for b in builds], env).to_build
    except store.StoreError:
        # one bad derivation fails the whole call: find it by asking one by one
        to_build: set[str] = set()
        for build in builds:
            try:
                to_build |= store.missing([build.drv_path], env).to_build
            except store.StoreError as exc:
                finals.append(BuildFinal(build.id, BuildStatus.aborted, str(exc)))
        return to_build


def _closure(cache: DrvCache, root: str, to_build: set[str]) -> list[str]:
    """Derivations of ``root``'s closure that must be built, root first."""
    if root not in to_build:
        return []
    seen = {root}
    order = [root]
    stack = [root]
    while stack:
        for dep in cache.get(stack.pop()).input_drvs:
            if dep in to_build and dep not in seen:
                seen.add(dep)
                order.append(dep)
                stack.append(dep)
    return order


def _cached_failures(session: Session, settings: Settings, drvs: set[str]
                     ) -> dict[str, BuildStatus]:
    runner = settings.queue_runner
    if not runner.failed_paths_cache or not drvs:
        return {}
    rows = session.execute(text("""
        SELECT drv_path, status FROM failed_paths
        WHERE drv_path = ANY(:drvs) AND failed_at > now() - make_interval(secs => :ttl)
    """), {"drvs": sorted(drvs), "ttl": float(runner.failed_paths_ttl)}).all()
    return {drv: BuildStatus(status) for drv, status in rows}


def _ensure_outputs(session: Session, cache: DrvCache, builds: list[_Build]) -> None:
    """``build_outputs`` rows from the derivation when the evaluator left none."""
    rows = [(b.id, name, path) for b in builds
            for name, path in cache.get(b.drv_path).outputs]
    if rows:
        session.execute(text("""
            INSERT INTO build_outputs (build_id, name, path)
            SELECT * FROM unnest(CAST(:ids AS bigint[]), CAST(:names AS text[]),
                                 CAST(:paths AS text[]))
            ON CONFLICT DO NOTHING
        """), {"ids": [r[0] for r in rows], "names": [r[1] for r in rows],
               "paths": [r[2] for r in rows]})


def _record_cached_failures(session: Session, cache: DrvCache, builds: list[_Build],
                            cached_for: dict[int, str], cached: dict[str, BuildStatus]) -> None:
    """A finished ``cached_failure`` step per failed derivation, linked to each build
    (so users see which derivation it was and a restart knows what to clear)."""
    drvs = sorted(set(cached_for.values()))
    infos = [cache.get(d) for d in drvs]
    ids = session.execute(text("""
        INSERT INTO steps (drv_path, system, required_features, queue_class, state, status,
                           is_fod, created_at, finished_at, error_message)
        SELECT v.drv, v.system, string_to_array(v.features, ' '), v.cls, 'done', :status,
               v.is_fod, now(), now(), 'in the failed-path cache'
        FROM unnest(CAST(:drvs AS text[]), CAST(:systems AS text[]),
                    CAST(:features AS text[]), CAST(:classes AS text[]),
                    CAST(:fods AS boolean[])) AS v(drv, system, features, cls, is_fod)
        RETURNING id, drv_path
    """), {"drvs": drvs, "systems": [i.system for i in infos],
           "features": [" ".join(i.required_features) for i in infos],
           "classes": [queue_class_name(i.system, i.required_features) for i in infos],
           "fods": [i.is_fod for i in infos],
           "status": int(BuildStatus.cached_failure)}).all()
    step_of = {drv: step_id for step_id, drv in ids}
    by_id = {b.id: b for b in builds}
    links = [(build_id, step_of[drv], drv, drv == by_id[build_id].drv_path)
             for build_id, drv in sorted(cached_for.items())]
    _insert_build_steps(session, links)


def _insert_build_steps(session: Session, links: list[tuple[int, int, str, bool]]) -> None:
    """Rows (build, step, drv, is_toplevel), numbered after the build's earlier steps."""
    if not links:
        return
    base: dict[int, int] = dict(session.execute(text("""
        SELECT build_id, max(step_nr) FROM build_steps WHERE build_id = ANY(:ids)
        GROUP BY build_id
    """), {"ids": sorted({link[0] for link in links})}).tuples().all())
    counters: Counter[int] = Counter()
    rows = []
    for build_id, step_id, drv, toplevel in links:
        counters[build_id] += 1
        rows.append((build_id, (base.get(build_id) or 0) + counters[build_id], step_id, drv,
                     toplevel))
    session.execute(text("""
        INSERT INTO build_steps (build_id, step_nr, step_id, drv_path, is_toplevel, created_at)
        SELECT v.build_id, v.nr, v.step_id, v.drv, v.toplevel, now()
        FROM unnest(CAST(:builds AS bigint[]), CAST(:nrs AS bigint[]),
                    CAST(:steps AS bigint[]), CAST(:drvs AS text[]),
                    CAST(:toplevels AS boolean[])) AS v(build_id, nr, step_id, drv, toplevel)
        ON CONFLICT (build_id, step_id) DO NOTHING
    """), {"builds": [r[0] for r in rows], "nrs": [r[1] for r in rows],
           "steps": [r[2] for r in rows], "drvs": [r[3] for r in rows],
           "toplevels": [r[4] for r in rows]})


@dataclass
class _Needs:
    """The derivations a batch's live builds must build, and what their steps inherit."""

    infos: dict[str, DrvInfo] = field(default_factory=dict)
    #: the first build (by id) needing the derivation: its jobset and timeouts go to the step
    owner: dict[str, _Build] = field(default_factory=dict)
    #: the highest priority of the builds needing it
    priority: Counter[str] = field(default_factory=Counter)
    #: how many of the batch's builds need it
    dependents: Counter[str] = field(default_factory=Counter)
    classes: dict[str, str] = field(default_factory=dict)

    @property
    def drvs(self) -> list[str]:
        return sorted(self.infos)


def _needs_of(cache: DrvCache, live: list[_Build], closures: dict[int, list[str]]) -> _Needs:
    needs = _Needs()
    for build in sorted(live, key=lambda b: b.id):
        for drv in closures[build.id]:
            if drv not in needs.infos:
                needs.infos[drv] = cache.get(drv)
                needs.owner[drv] = build
            needs.priority[drv] = max(needs.priority.get(drv, build.priority), build.priority)
            needs.dependents[drv] += 1
    needs.classes = {d: queue_class_name(info.system, info.required_features)
                     for d, info in sorted(needs.infos.items())}
    return needs


def _create_steps(session: Session, settings: Settings, cache: DrvCache, live: list[_Build],
                  closures: dict[int, list[str]], report: StepReport) -> None:
    """Steps for ``live`` builds (steps 4 to 6 of the module docstring).

    Registers new queue classes, inserts or reuses a step per derivation
    (:func:`_insert_or_reuse_steps`), adds the new steps' edges and the
    ``build_steps`` rows, queues the new steps whose dependencies all succeeded,
    holds the reused ones (:func:`_hold_reused_steps`) and marks running the
    builds that wait for a step already running.
    """
    needs = _needs_of(cache, live, closures)
    drvs = needs.drvs
    report.new_classes = _register_classes(session, needs.infos, needs.classes)
    step_of, created = _insert_or_reuse_steps(session, needs)
    report.new_steps = len(created)
    _insert_edges(session, needs, step_of, created)
    _insert_build_steps(session, [(b.id, step_of[d], d, d == b.drv_path)
                                  for b in live for d in closures[b.id]])
    if created:
        _already_built(session, settings, cache, sorted(created), report)
        _queue_ready(session, created, report)
    reused_drvs = [d for d in drvs if step_of[d] not in created]
    if reused_drvs:
        _hold_reused_steps(session, settings, cache, reused_drvs, step_of, needs, created,
                           report)
    _start_builds_with_running_steps(session, live)


def _insert_or_reuse_steps(session: Session, needs: _Needs) -> tuple[dict[str, int], set[int]]:
    """drv -> its step, and the ids of the steps inserted here.

    A derivation another step built after Nix's answer needs no step of its own.
    An insert that meets an active step of the same derivation (the partial
    unique index) reuses it; one that failed meanwhile is no longer active, so
    the next round inserts anew.
    """
    drvs = needs.drvs
    step_of: dict[str, int] = _reusable_steps(session, drvs, active=False)
    created: set[int] = set()
    remaining = [d for d in drvs if d not in step_of]
    for _ in range(5):
        if not remaining:
            break
        for step_id, drv in _insert_pending_steps(session, needs, remaining):
            step_of[drv] = step_id
            created.add(step_id)
        others = [d for d in remaining if d not in step_of]
        if others:
            # Reuse the active steps (locked only at the end: _hold_reused_steps), or
            # one that built the derivation since this batch asked Nix (it counts as
            # finished there); a step that failed meanwhile makes the loop insert anew.
            step_of.update(_reusable_steps(session, others))
        remaining = [d for d in remaining if d not in step_of]
    if remaining:
        raise RuntimeError(f"could not create steps for {len(remaining)} derivations")
    return step_of, created


def _insert_pending_steps(session: Session, needs: _Needs, drvs: list[str]
                          ) -> list[tuple[int, str]]:
    """Insert a pending step per derivation with no active step; (id, drv) of those
    inserted."""
    owner = needs.owner
    return [(step_id, drv) for step_id, drv in session.execute(text("""
        INSERT INTO steps (drv_path, system, required_features, queue_class, state, priority,
                           jobset_id, dependents, is_fod, timeout, max_silent, created_at)
        SELECT v.drv, v.system, string_to_array(v.features, ' '), v.cls,
               'pending', v.priority, v.jobset_id, v.dependents, v.is_fod, v.timeout,
               v.max_silent, now()
        FROM unnest(CAST(:drvs AS text[]), CAST(:systems AS text[]),
                    CAST(:features AS text[]), CAST(:classes AS text[]),
                    CAST(:priorities AS integer[]), CAST(:jobsets AS bigint[]),
                    CAST(:dependents AS integer[]), CAST(:fods AS boolean[]),
                    CAST(:timeouts AS integer[]), CAST(:silents AS integer[]))
             AS v(drv, system, features, cls, priority, jobset_id, dependents, is_fod,
                  timeout, max_silent)
        ORDER BY v.drv
        ON CONFLICT (drv_path) WHERE state <> 'done' DO NOTHING
        RETURNING id, drv_path
    """), {
        "drvs": drvs,
        "systems": [needs.infos[d].system for d in drvs],
        "features": [" ".join(needs.infos[d].required_features) for d in drvs],
        "classes": [needs.classes[d] for d in drvs],
        "priorities": [needs.priority[d] for d in drvs],
        "jobsets": [owner[d].jobset_id for d in drvs],
        "dependents": [needs.dependents[d] for d in drvs],
        "fods": [needs.infos[d].is_fod for d in drvs],
        "timeouts": [owner[d].timeout for d in drvs],
        "silents": [owner[d].max_silent for d in drvs],
    }).tuples()]


def _insert_edges(session: Session, needs: _Needs, step_of: dict[str, int],
                  created: set[int]) -> None:
    """``step_dependencies`` of the new steps (a reused step has its edges already)."""
    edges = sorted({(step_of[d], step_of[i]) for d in needs.drvs if step_of[d] in created
                    for i in needs.infos[d].input_drvs if i in step_of})
    if edges:
        session.execute(text("""
            INSERT INTO step_dependencies (step_id, depends_on_id)
            SELECT * FROM unnest(CAST(:a AS bigint[]), CAST(:b AS bigint[]))
            ON CONFLICT DO NOTHING
        """), {"a": [e[0] for e in edges], "b": [e[1] for e in edges]})


def _queue_ready(session: Session, created: set[int], report: StepReport) -> None:
    """New steps whose dependencies all succeeded are queued."""
    queued = session.execute(text(f"""
        UPDATE steps AS s SET state = 'queued', queued_at = now(), published_at = now()
        WHERE s.id = ANY(:ids) AND s.state = 'pending' AND {dependencies_succeeded("s")}
        RETURNING s.queue_class
    """), {"ids": sorted(created)}).scalars().all()
    report.queued.update(queued)


def _start_builds_with_running_steps(session: Session, live: list[_Build]) -> None:
    """Builds that wait for a step already running (reused) are running."""
    session.execute(text(f"""
        UPDATE builds SET status = {RUNNING}, started_at = COALESCE(started_at, now()),
                          notification_pending_since = now()
        WHERE id = ANY(:ids) AND status = {PENDING} AND EXISTS (
            SELECT 1 FROM build_steps bs JOIN steps s ON s.id = bs.step_id
            WHERE bs.build_id = builds.id AND s.state = 'running')
    """), {"ids": [b.id for b in live]})


def _reusable_steps(session: Session, drvs: list[str], *, active: bool = True
                    ) -> dict[str, int]:
    """drv → a step to reuse: an active one (when ``active``), else one that succeeded
    since this transaction began (after this batch's ``--dry-run``)."""
    return dict(session.execute(text(f"""
        SELECT DISTINCT ON (drv_path) drv_path, id FROM steps
        WHERE drv_path = ANY(:drvs)
          AND ((:active AND state <> 'done')
               OR ({step_succeeded("steps")} AND finished_at >= now()))
        ORDER BY drv_path, state = 'done', id DESC
    """), {"drvs": drvs, "active": active}).tuples().all())


def _hold_reused_steps(session: Session, settings: Settings, cache: DrvCache,
                       reused_drvs: list[str], step_of: dict[str, int], needs: _Needs,
                       created: set[int], report: StepReport) -> None:
    """Lock the reused active steps until commit, and catch up on those that finished.

    The lock (FOR SHARE) makes a worker finishing one of them wait for this
    commit, so it sees the new edges and ``build_steps`` and settles the new
    builds too. It is taken last, so workers finishing shared steps wait only for
    the end of this transaction, not for the bulk inserts before it (650 ms of
    stalled workers per 450-build batch in ``bench/build_overhead.py``). A step
    that finished before the lock was taken did so without seeing this batch's
    rows: its consequences for them (queue dependents, propagate a failure,
    settle builds) are applied here; each of those updates is conditional, so
    what the worker already did is not done twice. Only this batch's new steps are
    queued here: the worker queued the others, and locking rows other workers may
    hold while this transaction holds the shared locks could deadlock.
    """
    ids = sorted({step_of[d] for d in reused_drvs})
    alive = set(session.execute(text("""
        SELECT id FROM steps WHERE id = ANY(:ids) AND state <> 'done' ORDER BY id FOR SHARE
    """), {"ids": ids}).scalars())
    session.execute(text("""
        UPDATE steps AS s SET priority = GREATEST(s.priority, v.priority),
                              dependents = s.dependents + v.dependents
        FROM unnest(CAST(:ids AS bigint[]), CAST(:priorities AS integer[]),
                    CAST(:dependents AS integer[])) AS v(id, priority, dependents)
        WHERE s.id = v.id AND s.state <> 'done'
    """), {"ids": [step_of[d] for d in reused_drvs],
           "priorities": [needs.priority[d] for d in reused_drvs],
           "dependents": [needs.dependents[d] for d in reused_drvs]})
    finished = [i for i in ids if i not in alive]
    if not finished:
        return
    done = done_steps(session, finished)
    results = {d.id: read_output_result(cache.get(d.drv_path).output_paths) for d in done
               if d.status is BuildStatus.succeeded}
    caught_up = after_steps_done(session, settings, done, results, queue_only=created,
                                 advance=False)
    report.queued.update(caught_up.queued)
    report.finished.merge(caught_up.builds)


def _already_built(session: Session, settings: Settings, cache: DrvCache, created: list[int],
                   report: StepReport) -> None:
    """New steps whose derivation another step built after Nix's answer: succeeded.

    The other step was still active when this batch asked Nix, and finished
    before the insert (which waited for it). Checked after the insert, so the
    race has no window.
    """
    rows = session.execute(text(f"""
        UPDATE steps AS s SET state = 'done', status = {SUCCEEDED}, finished_at = now(),
                              error_message = 'built meanwhile by another step'
        WHERE s.id = ANY(:ids) AND s.state = 'pending' AND EXISTS (
            SELECT 1 FROM steps o
            WHERE o.drv_path = s.drv_path AND o.id <> s.id AND {step_succeeded("o")}
              AND o.finished_at >= now())
        RETURNING s.id, s.drv_path, s.is_fod
    """), {"ids": created}).all()
    if not rows:
        return
    done = [DoneStep(r.id, BuildStatus.succeeded, r.drv_path, r.is_fod) for r in rows]
    results = {r.id: read_output_result(cache.get(r.drv_path).output_paths) for r in rows}
    finished = after_steps_done(session, settings, done, results, advance=False)
    report.queued.update(finished.queued)
    report.finished.merge(finished.builds)


def _register_classes(session: Session, needed: dict[str, DrvInfo], classes: dict[str, str]
                      ) -> list[str]:
    """Insert the queue classes not known yet; returns their names."""
    names = sorted(set(classes.values()))
    first = {cls: next(d for d in sorted(needed) if classes[d] == cls) for cls in names}
    rows = session.execute(text("""
        INSERT INTO queue_classes (name, system, required_features, created_at)
        SELECT v.name, v.system, string_to_array(v.features, ' '), now()
        FROM unnest(CAST(:names AS text[]), CAST(:systems AS text[]), CAST(:features AS text[]))
             AS v(name, system, features)
        ON CONFLICT (name) DO NOTHING
        RETURNING name
    """), {"names": names, "systems": [needed[first[c]].system for c in names],
           "features": [" ".join(needed[first[c]].required_features) for c in names]}
    ).scalars().all()
    return list(rows)
