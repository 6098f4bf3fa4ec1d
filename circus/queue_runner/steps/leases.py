"""Claiming steps and holding them with a lease (DESIGN §3).

The database, not the broker, decides who builds what. A consumer woken by a
message claims the best queued steps of its class with one conditional
``UPDATE ... FOR UPDATE SKIP LOCKED``; zero rows means someone else got there
first. While it builds it renews a lease; the reconciler hands back steps
whose lease lapsed (worker killed, host gone), so nothing depends on the
broker redelivering a message (Redis' ``visibility_timeout``).

Order within a class: priority (``bump`` raises it), then jobset fair share
(running steps per ``scheduling_shares``), then optionally the number of
builds waiting (critical path), then age.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from circus.common.config import Settings
from circus.common.enums import BuildStatus
from circus.common.statussql import (
    PENDING,
    RUNNING,
    dependencies_succeeded,
    step_succeeded,
)
from circus.queue_runner.steps.outcomes import (
    FinishReport,
    StepOutcome,
    finish_steps,
)


@dataclass(frozen=True)
class ClaimedStep:
    id: int
    drv_path: str
    system: str
    queue_class: str
    timeout: int | None
    max_silent: int | None
    attempts: int
    #: claimed ahead of its dependencies, which this claim also holds
    lookahead: bool
    started_at: datetime | None


_RETURNING = ("RETURNING steps.id, steps.drv_path, steps.system, steps.queue_class, "
              "steps.timeout, steps.max_silent, steps.attempts, steps.started_at")


def _take(state: str) -> str:
    """SQL: the steps of ``pick`` still in ``state`` become running under this claim's
    lease (``:worker``, ``:machine``, ``:lease``), returned as claimed."""
    return f"""UPDATE steps SET state = 'running', worker = :worker, machine = :machine,
                         lease_until = now() + make_interval(secs => :lease),
                         started_at = now()
        FROM pick WHERE steps.id = pick.id AND steps.state = '{state}'
        {_RETURNING}"""


def trusted_condition(project_ids: Sequence[int] | None) -> str:
    """SQL: step ``s`` is one some evaluation of a branch (not a pull request) waits
    for, in one of the projects ``:projects`` when ``project_ids`` is given."""
    if project_ids is None:
        return """
    AND EXISTS (SELECT 1 FROM build_steps bs
                JOIN evaluation_builds eb ON eb.build_id = bs.build_id
                JOIN evaluations e ON e.id = eb.evaluation_id
                WHERE bs.step_id = s.id AND e.pr_number IS NULL)"""
    return """
    AND EXISTS (SELECT 1 FROM build_steps bs
                JOIN builds b ON b.id = bs.build_id
                JOIN evaluation_builds eb ON eb.build_id = bs.build_id
                JOIN evaluations e ON e.id = eb.evaluation_id
                WHERE bs.step_id = s.id AND e.pr_number IS NULL
                  AND b.project_id = ANY(CAST(:projects AS bigint[])))"""


#: queued steps of each jobset a claim considers (its head, in the order of the
#: ``ix_steps_queued_by_jobset`` index); more than the claims that can be in flight
#: at once, whose locked rows a claim skips
HEAD_PER_JOBSET = 64


def _heads(conditions: str, critical_path: bool) -> str:
    """SQL: the first ``:per_jobset`` queued steps of class ``:cls`` of every jobset
    (and of no jobset) meeting ``conditions`` on ``s``.

    The claim order is priority, then the jobset's fair share, then age; within one
    jobset the share is the same for every step, so the step a claim wants is at the
    head of its jobset. Ordering the heads alone, not every queued step, keeps a
    claim at a few index probes per jobset however long the backlog: with 100,000
    queued, sorting them all took ~0.7 s a claim (``bench/dispatch_scale.py``).

    Rows other claims hold locked are skipped. Only while every head of a jobset
    is being claimed at once can a claim take another jobset's step before that
    jobset's next one (the order bends for a moment; no step is lost or taken
    twice); with no head free anywhere, the claim orders every queued step.
    """
    within = "s.priority DESC, s.dependents DESC, s.id" if critical_path \
        else "s.priority DESC, s.id"
    head = f"""
            SELECT s.id FROM steps s
            WHERE s.state = 'queued' AND s.queue_class = :cls AND {{jobset}}
              AND (s.not_before IS NULL OR s.not_before <= now()) {conditions}
            ORDER BY {within}
            LIMIT :per_jobset"""
    return f"""
        SELECT h.id FROM jobsets js CROSS JOIN LATERAL ({head.format(jobset="s.jobset_id = js.id")}
        ) h
        UNION ALL
        ({head.format(jobset="s.jobset_id IS NULL")})"""


def _order(critical_path: bool) -> str:
    parts = ["s.priority DESC",
             "COALESCE(r.n, 0)::float8 / GREATEST(COALESCE(j.scheduling_shares, 100), 1)"]
    if critical_path:
        parts.append("s.dependents DESC")
    parts.append("s.id")
    return ", ".join(parts)


@dataclass(frozen=True)
class ClaimOptions:
    """What one claim may take; every consumer builds one per claim.

    Raises ``ValueError`` for a limit below one (a claim always takes a step, so
    a zero limit would silently mean one).
    """

    #: queued steps to claim at most (they share their timeouts)
    limit: int = 1
    #: recorded as ``steps.machine``; default: the worker's name
    machine: str | None = None
    #: also claim pending dependents whose unfinished dependencies are all in this claim
    lookahead: bool = True
    #: order by the number of builds waiting before age (``critical_path_first``)
    critical_path: bool = False
    #: steps in all, look-ahead included (default and minimum: ``limit``)
    batch_limit: int | None = None
    #: only steps some branch (not pull-request) evaluation needs (ephemeral and OIDC agents)
    trusted_only: bool = False
    #: with ``trusted_only``: only such evaluations of these projects
    project_ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.limit < 1:
            raise ValueError(f"a claim takes at least one step, not {self.limit}")
        if self.batch_limit is not None and self.batch_limit < 1:
            raise ValueError(f"batch_limit must be at least one, not {self.batch_limit}")
        if self.project_ids is not None and not self.trusted_only:
            raise ValueError("project_ids narrow trusted_only claims; set trusted_only")

    @property
    def batch_size(self) -> int:
        """Steps this claim may hold in all."""
        return max(self.limit, self.batch_limit or self.limit)

    @property
    def looks_ahead(self) -> bool:
        # look-ahead picks dependents without the trusted-evaluation check
        return self.lookahead and not self.trusted_only

    def alone(self) -> ClaimOptions:
        """These options for a retried step, which is built alone: if it is what broke
        its last batch (killed nix-store, crashed the worker), it cannot take innocent
        steps down with it."""
        return replace(self, limit=1, batch_limit=1, lookahead=False)


def claim_steps(session: Session, worker: str, queue_class: str, options: ClaimOptions, *,
                lease_secs: int) -> list[ClaimedStep]:
    """Claim queued steps of ``queue_class`` for ``worker`` (running, leased) as
    ``options`` allow (see :class:`ClaimOptions`).

    1. the best queued step is locked first; its timeouts are the claim's (one Nix
       invocation builds the claimed steps), and a retried step is claimed alone;
    2. up to ``options.limit`` queued steps with those timeouts become running;
    3. with look-ahead, pending steps of the same class whose unfinished
       dependencies are all in this claim are claimed too, wave by wave, up to
       ``options.batch_size`` steps in all: Nix builds a chain in one invocation
       instead of one round trip per link;
    4. the builds waiting for the claimed steps become running.

    With ``trusted_only``, a step wanted by pull-request evaluations alone is left
    to other builders.
    """
    params: dict[str, Any] = {"cls": queue_class, "worker": worker,
                              "lease": float(lease_secs), "machine": options.machine or worker,
                              "projects": list(options.project_ids or []),
                              "per_jobset": max(options.limit, HEAD_PER_JOBSET)}
    first = _best_queued(session, options, params)
    if first is None:
        return []
    if first.attempts:
        options = options.alone()
    params.update({"timeout": first.timeout, "max_silent": first.max_silent,
                   "limit": options.limit, "first": first.id})
    claimed = [_claimed(row, lookahead=False)
               for row in _claim_queued(session, options, params)]
    if options.looks_ahead:
        claimed += _claim_ready_dependents(session, params, [c.id for c in claimed],
                                           options.batch_size)
    if claimed:
        _start_waiting_builds(session, [c.id for c in claimed])
    return claimed


#: running steps per jobset, the fair-share weight of :func:`_order`
_RUNNING_PER_JOBSET = """r AS (SELECT jobset_id, count(*) AS n FROM steps WHERE state = 'running'
                   GROUP BY jobset_id)"""


def _trusted(options: ClaimOptions) -> str:
    return trusted_condition(options.project_ids) if options.trusted_only else ""


def _best_queued(session: Session, options: ClaimOptions, params: dict[str, Any]) -> Any:
    """The queued step to claim first (locked until the end of the transaction), or None.

    It is looked for among the jobsets' heads (:func:`_heads`) first; only when every
    head is locked by other claims (or nothing is queued) among every queued step.
    """
    def best(among: str) -> Any:
        return session.execute(text(f"""
            WITH {_RUNNING_PER_JOBSET}
            SELECT s.id, s.timeout, s.max_silent, s.attempts FROM steps s
            LEFT JOIN r ON r.jobset_id = s.jobset_id
            LEFT JOIN jobsets j ON j.id = s.jobset_id
            WHERE s.state = 'queued' AND s.queue_class = :cls
              AND (s.not_before IS NULL OR s.not_before <= now()) {_trusted(options)} {among}
            ORDER BY {_order(options.critical_path)}
            LIMIT 1
            FOR UPDATE OF s SKIP LOCKED
        """), params).first()

    # ``= ANY(ARRAY(...))``: the heads are looked up by primary key, never joined to a
    # scan of every queued step
    first = best(f"AND s.id = ANY(ARRAY({_heads(_trusted(options), options.critical_path)}))")
    return first if first is not None else best("")


def _claim_queued(session: Session, options: ClaimOptions, params: dict[str, Any]
                  ) -> Sequence[Any]:
    """Up to ``:limit`` queued steps with the first one's timeouts become running (the
    first one included, as this transaction holds its lock, which SKIP LOCKED does not
    skip; no other retried step), taken from the jobsets' heads."""
    same_batch = f"""
              AND s.timeout IS NOT DISTINCT FROM :timeout
              AND s.max_silent IS NOT DISTINCT FROM :max_silent
              AND (s.attempts = 0 OR s.id = :first) {_trusted(options)}"""
    return session.execute(text(f"""
        WITH {_RUNNING_PER_JOBSET},
        pick AS (
            SELECT s.id FROM steps s
            LEFT JOIN r ON r.jobset_id = s.jobset_id
            LEFT JOIN jobsets j ON j.id = s.jobset_id
            WHERE s.state = 'queued' AND s.queue_class = :cls
              AND (s.not_before IS NULL OR s.not_before <= now())
              AND s.id = ANY(ARRAY({_heads(same_batch, options.critical_path)}
                                   UNION ALL SELECT CAST(:first AS bigint)))
              {same_batch}
            ORDER BY {_order(options.critical_path)}
            LIMIT :limit
            FOR UPDATE OF s SKIP LOCKED
        )
        {_take('queued')}
    """), params).all()


#: candidate rows the single-statement look-ahead reads at most; a wider graph (a step
#: thousands of pending steps depend on) is claimed wave by wave instead
LOOKAHEAD_READ_CAP = 1000

#: a pending step of the claim's class that a look-ahead may take (alias ``p``)
_LOOKAHEAD_CANDIDATE = """p.state = 'pending' AND p.queue_class = :cls
                  AND p.timeout IS NOT DISTINCT FROM :timeout
                  AND p.max_silent IS NOT DISTINCT FROM :max_silent
                  AND p.attempts = 0"""


def _claim_ready_dependents(session: Session, params: dict[str, Any], held: list[int],
                            batch_size: int) -> list[ClaimedStep]:
    """Look-ahead: pending steps whose unfinished dependencies are all ``held``, wave
    after wave (each wave's steps are the next one's frontier), until ``held`` counts
    ``batch_size`` steps or a wave adds none.

    The waves are worked out from one read of the candidates within reach
    (:func:`_lookahead_candidates`) and claimed with one statement: a chain used to
    cost a query per link. When the read finds too many candidates (a very wide graph),
    each wave is read and claimed by a statement of its own.
    """
    room = batch_size - len(held)
    if room <= 0:
        return []
    candidates = _lookahead_candidates(session, params, held, room)
    if candidates is None:
        return _claim_waves(session, params, held, batch_size)
    chosen = _plan_waves(candidates, held, batch_size)
    if not chosen:
        return []
    rows = session.execute(text(f"""
        WITH pick AS (
            SELECT s.id FROM steps s
            WHERE s.id = ANY(:chosen) AND s.state = 'pending'
            ORDER BY s.id
            FOR UPDATE OF s SKIP LOCKED
        )
        {_take('pending')}
    """), {**params, "chosen": chosen}).all()
    by_id = {row.id: row for row in rows}
    if len(by_id) < len(chosen):
        # another transaction held or changed some (rare): keep only the steps whose
        # unfinished dependencies are still all in this claim, and give back the rest
        # as they were (pending and unclaimed; this transaction changed them alone)
        kept = set(held)
        for step_id in chosen:
            if step_id in by_id and candidates[step_id][1] <= kept:
                kept.add(step_id)
        given_back = [step_id for step_id in by_id if step_id not in kept]
        if given_back:
            session.execute(text("""
                UPDATE steps SET state = 'pending', worker = NULL, machine = NULL,
                                 lease_until = NULL, started_at = NULL
                WHERE id = ANY(:ids)
            """), {"ids": given_back})
        by_id = {step_id: row for step_id, row in by_id.items() if step_id in kept}
    return [_claimed(by_id[step_id], lookahead=True) for step_id in chosen
            if step_id in by_id]


def _lookahead_candidates(session: Session, params: dict[str, Any], held: list[int],
                          room: int) -> dict[int, tuple[int, frozenset[int]]] | None:
    """Pending steps a look-ahead from ``held`` could reach within ``room`` waves:
    id → (priority, its dependencies that have not succeeded); None when there are
    more than :data:`LOOKAHEAD_READ_CAP`."""
    rows = session.execute(text(f"""
        WITH RECURSIVE reach(id, depth) AS (
            SELECT e.step_id, 1 FROM step_dependencies e JOIN steps p ON p.id = e.step_id
            WHERE e.depends_on_id = ANY(:held) AND {_LOOKAHEAD_CANDIDATE}
          UNION
            SELECT e.step_id, r.depth + 1 FROM reach r
            JOIN step_dependencies e ON e.depends_on_id = r.id
            JOIN steps p ON p.id = e.step_id
            WHERE r.depth < :room AND {_LOOKAHEAD_CANDIDATE}
        ),
        -- the recursion stops once this many rows were read (it is evaluated lazily)
        limited AS MATERIALIZED (SELECT id FROM reach LIMIT :cap)
        SELECT p.id, p.priority, ARRAY(
                   SELECT dependency.id FROM step_dependencies edge
                   JOIN steps dependency ON dependency.id = edge.depends_on_id
                   WHERE edge.step_id = p.id AND NOT {step_succeeded("dependency")}
               ) AS waiting_for,
               (SELECT count(*) FROM limited) AS read
        FROM (SELECT DISTINCT id FROM limited) found JOIN steps p ON p.id = found.id
    """), {**params, "held": held, "room": room, "cap": LOOKAHEAD_READ_CAP + 1}).all()
    if rows and rows[0].read > LOOKAHEAD_READ_CAP:
        return None
    return {row.id: (row.priority, frozenset(row.waiting_for)) for row in rows}


def _plan_waves(candidates: dict[int, tuple[int, frozenset[int]]], held: list[int],
                batch_size: int) -> list[int]:
    """The steps the waves take, in order: each wave takes the candidates that depend on
    the previous wave and wait for held steps only, by priority then id, no more than
    the previous wave (:func:`_wave_room`), while there is room."""
    taken = set(held)
    frontier = set(held)
    chosen: list[int] = []
    while frontier and len(taken) < batch_size:
        wave = sorted((step_id for step_id, (_, waiting_for) in candidates.items()
                       if step_id not in taken and waiting_for & frontier
                       and waiting_for <= taken),
                      key=lambda step_id: (-candidates[step_id][0], step_id))
        wave = wave[:_wave_room(len(frontier), batch_size - len(taken))]
        frontier = set(wave)
        taken.update(wave)
        chosen.extend(wave)
    return chosen


def _wave_room(frontier: int, room: int) -> int:
    """Steps a look-ahead wave may take: no more than the wave before it. A batch is
    built one derivation at a time, so following chains costs nothing, but taking in a
    fan-out (many steps waiting for one) would build serially what other slots could
    build side by side."""
    return min(frontier, room)


def _claim_waves(session: Session, params: dict[str, Any], held: list[int],
                 batch_size: int) -> list[ClaimedStep]:
    """:func:`_claim_ready_dependents` with a read and a claim per wave."""
    held = list(held)
    claimed: list[ClaimedStep] = []
    frontier = list(held)
    while frontier and len(held) < batch_size:
        more = session.execute(text(f"""
            WITH cand AS (
                SELECT DISTINCT p.id FROM step_dependencies e JOIN steps p ON p.id = e.step_id
                WHERE e.depends_on_id = ANY(:frontier) AND {_LOOKAHEAD_CANDIDATE}
                  AND {dependencies_succeeded("p", or_held=":held")}
            ),
            pick AS (
                SELECT s.id FROM steps s JOIN cand ON cand.id = s.id
                WHERE s.state = 'pending'
                ORDER BY s.priority DESC, s.id
                LIMIT :room
                FOR UPDATE OF s SKIP LOCKED
            )
            {_take('pending')}
        """), {**params, "frontier": frontier, "held": held,
               "room": _wave_room(len(frontier), batch_size - len(held))}).all()
        frontier = [row.id for row in more]
        held.extend(frontier)
        claimed.extend(_claimed(row, lookahead=True) for row in more)
    return claimed


def queued_chains(session: Session, queue_class: str, sample: int) -> bool:
    """Whether a look-ahead would follow a chain from some of ``queue_class``'s queued
    steps: one of ``sample`` of them has a pending dependent of the class waiting for
    it alone. (A dependent also waiting for others, such as a fan-in's top, is taken
    only with all of them; ``sample`` bounds the read at a deep queue.)"""
    return bool(session.execute(text(f"""
        SELECT EXISTS (
            SELECT 1 FROM (SELECT id FROM steps WHERE state = 'queued' AND queue_class = :cls
                           LIMIT :sample) q
            JOIN step_dependencies e ON e.depends_on_id = q.id
            JOIN steps p ON p.id = e.step_id
            WHERE p.state = 'pending' AND p.queue_class = :cls
              AND {dependencies_succeeded("p", or_held="ARRAY[q.id]")})
    """), {"cls": queue_class, "sample": sample}).scalar_one())


def _start_waiting_builds(session: Session, step_ids: list[int]) -> None:
    """Builds waiting for a step that started are running."""
    session.execute(text(f"""
        UPDATE builds SET status = {RUNNING}, started_at = COALESCE(started_at, now()),
                          notification_pending_since = now()
        WHERE status = {PENDING}
          AND id IN (SELECT build_id FROM build_steps WHERE step_id = ANY(:ids))
    """), {"ids": step_ids})


def _claimed(row: object, lookahead: bool) -> ClaimedStep:
    return ClaimedStep(row.id, row.drv_path, row.system, row.queue_class,  # type: ignore[attr-defined]
                       row.timeout, row.max_silent, row.attempts,  # type: ignore[attr-defined]
                       lookahead, row.started_at)  # type: ignore[attr-defined]


def renew_lease(session: Session, worker: str, step_ids: list[int], lease_secs: int
                ) -> set[int]:
    """Extend the lease on steps ``worker`` still holds; returns those ids.

    A step missing from the answer was taken away (cancelled, or handed to
    another worker after the lease lapsed): its builder must be stopped.
    """
    if not step_ids:
        return set()
    rows = session.execute(text("""
        UPDATE steps SET lease_until = now() + make_interval(secs => :lease)
        WHERE id = ANY(:ids) AND state = 'running' AND worker = :worker
        RETURNING id
    """), {"ids": step_ids, "worker": worker, "lease": float(lease_secs)}).scalars().all()
    return set(rows)


def holds_lease(session: Session, worker: str, step_id: int) -> bool:
    """Is ``step_id`` running under ``worker``'s lease right now?"""
    return session.execute(text(
        "SELECT 1 FROM steps WHERE id = :id AND state = 'running' AND worker = :worker"),
        {"id": step_id, "worker": worker}).first() is not None


def waits_for(session: Session, build_id: int, step_id: int) -> bool:
    """Does build ``build_id`` need step ``step_id``?"""
    return session.execute(text(
        "SELECT 1 FROM build_steps WHERE build_id = :build AND step_id = :step"),
        {"build": build_id, "step": step_id}).first() is not None


def release_steps(session: Session, worker: str, step_ids: list[int]) -> Counter[str]:
    """Hand steps back without counting an attempt (shutdown, batch interrupted).

    A step returns to ``queued`` when its dependencies all succeeded, else to
    ``pending`` (a look-ahead step whose dependency was handed back with it).
    Returns queue class -> steps queued again (publish wake-ups after commit).
    """
    if not step_ids:
        return Counter()
    rows = session.execute(text(f"""
        UPDATE steps AS s SET
            state = CASE WHEN {dependencies_succeeded("s")}
                         THEN 'queued' ELSE 'pending' END,
            worker = NULL, lease_until = NULL, started_at = NULL, machine = NULL,
            queued_at = now(), published_at = now()
        WHERE s.id = ANY(:ids) AND s.state = 'running' AND s.worker = :worker
        RETURNING s.state, s.queue_class
    """), {"ids": step_ids, "worker": worker}).all()
    return Counter(cls for state, cls in rows if state == "queued")


def expire_leases(session: Session, settings: Settings) -> FinishReport:
    """Steps whose holder stopped renewing: back to the queue, or ``aborted`` after
    ``max_retries`` attempts. Attempts count, so a derivation that kills its
    worker every time cannot loop forever."""
    runner = settings.queue_runner
    report = FinishReport()
    # A look-ahead step (its dependency was in the same lapsed batch) did not fail
    # itself: it always goes back to pending and follows its dependency's fate.
    requeued = session.execute(text(f"""
        WITH lapsed AS (
            SELECT s.id FROM steps s
            WHERE s.state = 'running' AND s.lease_until < now()
              AND (s.attempts < :max_retries OR NOT {dependencies_succeeded("s")})
            ORDER BY s.id FOR UPDATE SKIP LOCKED
        )
        UPDATE steps AS s SET
            state = CASE WHEN {dependencies_succeeded("s")}
                         THEN 'queued' ELSE 'pending' END,
            error_message = 'lease of ' || COALESCE(s.worker, '?') || ' expired',
            worker = NULL, lease_until = NULL, started_at = NULL, machine = NULL,
            attempts = s.attempts + 1, queued_at = now(), published_at = now()
        FROM lapsed WHERE s.id = lapsed.id
        RETURNING s.id, s.state, s.queue_class
    """), {"max_retries": runner.max_retries}).all()
    report.requeued.extend(row.id for row in requeued)
    report.queued.update(row.queue_class for row in requeued if row.state == "queued")
    exhausted = session.execute(text("""
        SELECT id, worker FROM steps
        WHERE state = 'running' AND lease_until < now() AND attempts >= :max_retries
        ORDER BY id FOR UPDATE SKIP LOCKED
    """), {"max_retries": runner.max_retries}).all()
    if exhausted:
        outcomes = [StepOutcome(row.id, BuildStatus.aborted,
                                error_message=f"worker {row.worker} stopped renewing its lease "
                                              f"{runner.max_retries + 1} times")
                    for row in exhausted]
        report.merge(finish_steps(session, settings, None, outcomes))
    return report
