"""Claims, leases, logs and store paths of remote Celery workers, through the one StepHolder.

A ``circus-worker`` host has its own Nix store and no database password: it
consumes the class queues like a local worker, but every write about a step
goes through the server's ``/api/v1/workers`` routes, which call this module.

Statelessness: the database lease (``state = 'running' AND worker = <lease
holder>``) is the truth, so any server process may answer any request; each
call rebuilds the worker's :class:`StepHolder` from it (:meth:`RemoteWorkers.holder`).

The lease holder is ``remote:<name>:<credential fingerprint>``: the name the
worker gave plus the first 16 hex digits of its token's digest. So a second
worker using a connected name with another token holds nothing of the first
one's (every lease check fails), and :meth:`RemoteWorkers.check_name` refuses
it outright while the first still holds steps. No table is needed for that.

Inputs travel through the binary cache: a claim publishes the step's input
closure (.drv files, their sources, the inputs' outputs) into ``/nix-cache``,
signed, and the worker substitutes from there (``nix copy --from``) with its token
as netrc credentials. Paths new to the cache are served to workers only; the token
opens them (and hidden projects' paths) only for the steps the worker holds
(:meth:`RemoteWorkers.fetchable`).

Every route checks, before it touches the store: the step is leased to this
worker; an upload is spooled in full and every path in it is one of the step's outputs
(``nix.export.verify_export``) before ``nix-store --import`` runs, else nothing
is imported and the step ends aborted without another attempt (as for agents).
Signing and publishing happen here, after the outputs are valid in the
server's store (``postprocess.publish_later``).
"""

from __future__ import annotations

import logging
import re
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, Any

from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from circus.cache.publish import UploadError, publish_paths, signing_key
from circus.common.config import Settings
from circus.common.db import in_transaction
from circus.common.enums import BuildStatus
from circus.common.errors import Conflict, InvalidInput, NotFound, PermissionDenied, Unauthenticated
from circus.common.heartbeat import QUEUE_RUNNER_KIND, STALE_AFTER, beat
from circus.common.nix import store
from circus.common.nix.derivation import read_derivation
from circus.common.nix.export import ExportRefused, verify_export
from circus.common.nix.transfer import import_file_sync
from circus.common.tokens import token_accepted, token_digest
from circus.queue_runner.builds.postprocess import publish_later
from circus.queue_runner.builds.products import OutputResult, read_output_result
from circus.queue_runner.builds.results import publishes_inline
from circus.queue_runner.routing.capabilities import Capabilities
from circus.queue_runner.routing.wakeups import Publish
from circus.queue_runner.steps.holder import StepHolder
from circus.queue_runner.steps.leases import ClaimOptions
from circus.queue_runner.steps.logs import final_log, log_path_for
from circus.queue_runner.steps.outcomes import FinishReport, StepOutcome

log = logging.getLogger(__name__)

HOLDER_PREFIX = "remote:"
#: worker names: no ``:`` (the lease holder is ``remote:<name>:<fingerprint>``)
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
#: a worker's host name as it reports it (like an agent's: at most 255 characters)
HOSTNAME_PATTERN = r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,254}\Z"
QUEUE_CLASS_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}(\.[A-Za-z0-9_+.-]{1,512})?")
#: hex digits of the token digest in the lease holder
FINGERPRINT = 16
#: a step's claim answers at most this many (one per free slot)
MAX_CLAIM = 64
SPOOL_CHUNK = 1024 * 1024

#: how the worker's outcome shows as a step status; ``None`` = infrastructure, retried
STATUS_OF_OUTCOME: dict[str, BuildStatus | None] = {
    "success": BuildStatus.succeeded,
    "failed": BuildStatus.failed,
    "failed_with_output": BuildStatus.failed_with_output,
    "timed_out": BuildStatus.timeout,
    "log_limit_exceeded": BuildStatus.log_limit_exceeded,
    "oom_killed": BuildStatus.oom_killed,
    "aborted": None,
    "cancelled": None,
    "import_failure": None,
    "upload_failure": None,
}


class _ClosureCache:
    """Input closures of held steps' derivations, per process (bounded, thread-safe).
    A worker's Nix asks for each input's narinfo and NAR, and each answer checks the
    closures of the steps it holds: one Nix call per step, not per request. A held
    step is runnable, so its inputs' outputs are valid and its closure is final."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, frozenset[str]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, drv_path: str) -> frozenset[str] | None:
        with self._lock:
            found = self._items.get(drv_path)
            if found is not None:
                self._items.move_to_end(drv_path)
            return found

    def put(self, drv_path: str, closure: frozenset[str]) -> None:
        with self._lock:
            self._items[drv_path] = closure
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)


_INPUT_CLOSURES = _ClosureCache(256)


@dataclass(frozen=True)
class RemoteWorker:
    """An authenticated caller: the name it gave and its token's digest."""

    name: str
    credential: str

    @property
    def fingerprint(self) -> str:
        return self.credential[:FINGERPRINT]

    @property
    def lease_holder(self) -> str:
        return f"{HOLDER_PREFIX}{self.name}:{self.fingerprint}"

    @property
    def name_prefix(self) -> str:
        return f"{HOLDER_PREFIX}{self.name}:"


#: the heartbeat rows of remote workers are ``remote-worker:<name>``
HEARTBEAT_SERVICE_PREFIX = "remote-worker:"


def heartbeat_service(worker: RemoteWorker) -> str:
    return f"{HEARTBEAT_SERVICE_PREFIX}{worker.name}"


def authenticate(settings: Settings, token: str | None, name: str | None) -> RemoteWorker:
    """The worker behind a request's token and name, or the 4xx saying why not."""
    config = settings.remote_workers
    if not config.enabled:
        raise NotFound("remote workers are not enabled on this server "
                       "(remote_workers.auth_tokens)")
    if not token or not token_accepted(token, config.auth_tokens):
        raise Unauthenticated("invalid worker token")
    if not name or not NAME_PATTERN.fullmatch(name):
        raise InvalidInput("the X-Circus-Worker header must name the worker "
                           f"({NAME_PATTERN.pattern})")
    return RemoteWorker(name, token_digest(token))


@dataclass
class ClaimedWork:
    """What a worker needs to build one claimed step on its own store."""

    id: int
    drv_path: str
    queue_class: str
    outputs: dict[str, str]
    timeout: int
    max_silent: int
    max_log_size: int
    attempts: int
    #: the step's input closure (the .drv closure and its inputs' outputs), dependencies
    #: first: published in ``/nix-cache`` for the worker to substitute
    input_closure: list[str] = field(default_factory=list)


@dataclass
class FinishedStep:
    """A worker's report on one step."""

    step_id: int
    outcome: str
    exit_code: int | None = None
    started_at: float | None = None
    finished_at: float | None = None
    error_message: str | None = None
    log_bytes: int = 0


def spool_upload(stream: IO[bytes], spool: IO[bytes], limit: int) -> None:
    """Copy an upload in full to ``spool`` (it is verified before anything imports it);
    400 past ``limit`` bytes."""
    size = 0
    while chunk := stream.read(SPOOL_CHUNK):
        size += len(chunk)
        if size > limit:
            raise InvalidInput(f"the upload is larger than {limit} bytes "
                               "(remote_workers.max_upload_size)")
        spool.write(chunk)


def _utc(timestamp: float | None) -> datetime | None:
    return datetime.fromtimestamp(timestamp, UTC) if timestamp else None


class RemoteWorkers:
    """The service the ``/api/v1/workers`` routes call (one per request is fine)."""

    def __init__(self, settings: Settings, factory: sessionmaker[Session],
                 publish: Publish | None = None,
                 on_built: Callable[[FinishReport], None] | None = None) -> None:
        self.settings = settings
        self.factory = factory
        self.publish = publish
        self.on_built = on_built or self._publish_outputs
        self.nix_env = settings.nix_environ()

    # ------------------------------------------------------------ holder

    def holder(self, worker: RemoteWorker) -> StepHolder:
        """``worker``'s holder, holding what the database says it holds."""
        holder = StepHolder(self.settings, self.factory, worker.lease_holder,
                            publish=self.publish, on_built=self.on_built)
        with self.factory() as session:
            holder.adopt(session.execute(text(
                "SELECT id FROM steps WHERE state = 'running' AND worker = :worker"),
                {"worker": worker.lease_holder}).scalars())
        return holder

    @staticmethod
    def check_name(session: Session, worker: RemoteWorker) -> None:
        """Refuse a name that is connected (a fresh heartbeat) or holds steps under
        another credential; a worker that left (``leave``) or died frees its name."""
        other = session.execute(text("""
            SELECT 1 FROM steps
            WHERE state = 'running' AND starts_with(worker, :prefix) AND worker <> :holder
            UNION ALL
            SELECT 1 FROM service_heartbeats
            WHERE service = :service AND last_heartbeat > now() - :stale
              AND details ->> 'credential' IS DISTINCT FROM :fingerprint
            LIMIT 1
        """), {"prefix": worker.name_prefix, "holder": worker.lease_holder,
               "service": heartbeat_service(worker), "stale": STALE_AFTER,
               "fingerprint": worker.fingerprint}).first()
        if other is not None:
            log.warning("remote worker %r refused: the name holds steps under another "
                        "credential", worker.name)
            raise Conflict(f"refused: a worker named {worker.name!r} is connected with "
                           "another credential")

    def require_lease(self, worker: RemoteWorker, step_id: int) -> str:
        """The step's derivation when ``worker`` holds ``step_id``, else 403."""
        return self.require_leases(worker, [step_id])[step_id]

    def require_leases(self, worker: RemoteWorker, step_ids: Iterable[int]) -> dict[int, str]:
        """Each step's derivation when ``worker`` holds every one of ``step_ids``, else 403
        naming one it does not hold (a batch is all or nothing)."""
        wanted = sorted(set(step_ids))
        with self.factory() as session:
            self.check_name(session, worker)
            held: dict[int, str] = dict(session.execute(text(
                "SELECT id, drv_path FROM steps WHERE id = ANY(:ids) AND state = 'running' "
                "AND worker = :worker"),
                {"ids": wanted, "worker": worker.lease_holder}).tuples().all())
        for step_id in wanted:
            if step_id not in held:
                raise PermissionDenied(f"refused: step {step_id} is not leased to this worker")
        return held

    # ------------------------------------------------------------ presence

    def heartbeat(self, worker: RemoteWorker, capabilities: Capabilities, slots: int,
                  running: int, hostname: str | None = None, pid: int | None = None
                  ) -> list[str]:
        """Count the worker as a live consumer of its classes (the reconciler does not
        fail their steps as unsupported); returns the known classes it can serve. The
        row shows the worker's host and pid (as it reports them), not the server's."""

        def work(session: Session) -> list[str]:
            self.check_name(session, worker)
            beat(session, QUEUE_RUNNER_KIND, {
                "remote_worker": worker.name, "credential": worker.fingerprint,
                "capabilities": [capabilities.to_json()],
                "workers": slots, "running": running},
                service=heartbeat_service(worker), host=(hostname or worker.name, pid))
            known = session.execute(text("SELECT name FROM queue_classes")).scalars()
            return sorted({*capabilities.base_classes(),
                           *(c for c in known if capabilities.can_serve(c))})

        result: list[str] = in_transaction(self.factory, work)
        return result

    def leave(self, worker: RemoteWorker) -> list[int]:
        """A worker shutting down: its steps go back to the queue (no attempt counted)
        and its heartbeat row goes, so /health does not call the instance degraded
        for a worker that left on purpose (one that died stays: that is news)."""
        released = self.holder(worker).release()

        def work(session: Session) -> None:
            self.check_name(session, worker)
            session.execute(text("DELETE FROM service_heartbeats WHERE service = :service"),
                            {"service": heartbeat_service(worker)})

        in_transaction(self.factory, work)
        log.info("remote worker %s left (%d step(s) handed back)", worker.name, len(released))
        return released

    # ------------------------------------------------------------ claims

    def claim(self, worker: RemoteWorker, queue_class: str, limit: int) -> list[ClaimedWork]:
        """Lease up to ``limit`` queued steps of ``queue_class`` to ``worker`` (a batch it
        builds one after another in one slot), no more than its fair share of what is
        queued, and publish their input closures; the answer names what to fetch."""
        if not QUEUE_CLASS_PATTERN.fullmatch(queue_class):
            raise InvalidInput(f"{queue_class[:100]!r} is not a queue class")
        holder = self.holder(worker)
        runner = self.settings.queue_runner

        def work(session: Session) -> Any:
            self.check_name(session, worker)
            share = self.fair_share(session, queue_class, max(1, min(limit, MAX_CLAIM)))
            if not share:
                return []
            return holder.claim(session, queue_class, ClaimOptions(
                limit=share, machine=worker.name, lookahead=False,
                critical_path=runner.critical_path_first))

        self.require_signed_cache()
        claimed = in_transaction(self.factory, work)
        prepared: list[tuple[Any, dict[str, str], list[str]]] = []
        for step in claimed:
            try:
                outputs = read_derivation(step.drv_path).output_paths
                inputs = store.input_closure(step.drv_path, self.nix_env)
                _INPUT_CLOSURES.put(step.drv_path, frozenset(inputs))
            except (OSError, ValueError, store.StoreError) as exc:
                self._unprepared(holder, worker, [step], exc)
                continue
            prepared.append((step, dict(outputs), inputs))
        try:
            self.publish_inputs_of({step.id: inputs for step, _, inputs in prepared})
        except (store.StoreError, UploadError) as exc:
            self._unprepared(holder, worker, [step for step, _, _ in prepared], exc)
            prepared = []
        found = [ClaimedWork(
            step.id, step.drv_path, step.queue_class, outputs,
            step.timeout or runner.build_timeout, step.max_silent or runner.max_silent_time,
            runner.max_log_size, step.attempts, inputs) for step, outputs, inputs in prepared]
        if found:
            # publishing the inputs took part of the lease (seconds on a busy server,
            # for paths not in the cache yet): the worker's lease starts with the answer
            holder.renew()
            log.info("remote worker %s claimed %s", worker.name, [c.id for c in found])
        return found

    @staticmethod
    def fair_share(session: Session, queue_class: str, limit: int) -> int:
        """How many of ``queue_class``'s queued steps one claim may take: ``limit`` at
        most, and no more than the queued steps divided by the slots of the live remote
        workers (rounded down, at least one), so one worker's batch does not leave the
        others idle; 0 when nothing is queued.

        The queued steps are counted up to ``limit`` per slot only: beyond that the
        answer is ``limit`` anyway, and a class with 100,000 queued steps would
        otherwise cost every claim a walk over all of them."""
        waiting, slots = session.execute(text("""
            WITH live AS (
                SELECT greatest(1, coalesce(sum((details ->> 'workers')::int), 0)) AS slots
                FROM service_heartbeats
                WHERE starts_with(service, :prefix) AND last_heartbeat > now() - :stale)
            SELECT (SELECT count(*) FROM (
                        SELECT 1 FROM steps WHERE state = 'queued' AND queue_class = :cls
                        LIMIT :limit * (SELECT slots FROM live)) AS counted),
                   (SELECT slots FROM live)
        """), {"cls": queue_class, "prefix": HEARTBEAT_SERVICE_PREFIX,
               "stale": STALE_AFTER, "limit": limit}).one()
        if not waiting:
            return 0
        return max(1, min(limit, int(waiting) // int(slots)))

    def _unprepared(self, holder: StepHolder, worker: RemoteWorker, steps: list[Any],
                    exc: Exception) -> None:
        for step in steps:
            log.warning("step %d (%s): cannot prepare it for remote worker %s: %s",
                        step.id, step.drv_path, worker.name, exc)
        holder.finish([StepOutcome(step.id, BuildStatus.aborted, machine=worker.name,
                                   error_message=f"cannot prepare the step: {exc}",
                                   retry=True) for step in steps])

    def require_signed_cache(self) -> None:
        """409 unless ``/nix-cache`` is served and signed: a worker substitutes its
        inputs from it and trusts nothing unsigned."""
        if self.cache_public_key() is None:
            raise Conflict("remote workers fetch their inputs from /nix-cache, which this "
                           "server does not serve signed (cache.enabled, signing.enabled)")

    def cache_public_key(self) -> str | None:
        """The public key of ``/nix-cache``'s signatures, or None when it has none."""
        key = signing_key(self.settings)
        if key is None or not self.settings.cache.enabled:
            return None
        return str(key.public_key())

    def publish_inputs_of(self, inputs_of: Mapping[int, list[str]]) -> None:
        """Put claimed steps' input closures (their .drv files and their sources, their
        inputs' outputs) into ``/nix-cache``, signed, where the worker substitutes them
        from with its token (:meth:`fetchable`). Paths new to the cache are
        ``worker_only``: served to nobody else. Each closure is linked to the projects
        of the builds waiting for its step, as build outputs are (steps waited for by
        the same projects share one publish). Paths already recorded cost one query."""
        if not inputs_of:
            return

        def work(session: Session) -> None:
            projects_of: dict[int, set[int]] = {step_id: set() for step_id in inputs_of}
            for step_id, project_id in session.execute(text(
                    "SELECT DISTINCT bs.step_id, b.project_id FROM build_steps bs "
                    "JOIN builds b ON b.id = bs.build_id WHERE bs.step_id = ANY(:ids)"),
                    {"ids": sorted(inputs_of)}).tuples():
                projects_of[int(step_id)].add(int(project_id))
            groups: dict[tuple[int, ...], list[str]] = {}
            for step_id, inputs in inputs_of.items():
                groups.setdefault(tuple(sorted(projects_of[step_id])), []).extend(inputs)
            for projects, paths in groups.items():
                result = publish_paths(session, self.settings, list(dict.fromkeys(paths)),
                                       list(projects))
                if result.errors:
                    path, error = next(iter(result.errors.items()))
                    raise store.StoreError(f"cannot publish input {path}: {error}")

        in_transaction(self.factory, work)

    def renew(self, worker: RemoteWorker, step_ids: Iterable[int]) -> list[int]:
        """Extend the lease; returns the asked-for steps no longer held (stop them)."""
        asked = set(step_ids)
        holder = self.holder(worker)
        lost = asked - holder.held
        renewal = holder.renew()
        return sorted(lost | (asked & renewal.lost))

    def release(self, worker: RemoteWorker, step_ids: Iterable[int]) -> list[int]:
        return self.holder(worker).release(list(step_ids))

    # ------------------------------------------------------------ logs

    def append_log(self, worker: RemoteWorker, step_id: int, data: bytes) -> tuple[int, bool]:
        """Append to the step's log (the file local builds write); returns its size and
        whether the cap cut this chunk."""
        drv_path = self.require_lease(worker, step_id)
        path = log_path_for(self.settings.logs.log_dir, drv_path, step_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        limit = self.settings.queue_runner.max_log_size
        with path.open("ab") as handle:
            room = max(0, limit - handle.tell())
            handle.write(data[:room])
            return handle.tell(), len(data) > room

    # ------------------------------------------------------------ store paths

    def import_outputs(self, worker: RemoteWorker, step_id: int, stream: IO[bytes]
                       ) -> list[str]:
        """:meth:`import_outputs_of` for one step."""
        return self.import_outputs_of(worker, [step_id], stream)

    def import_outputs_of(self, worker: RemoteWorker, step_ids: list[int], stream: IO[bytes]
                          ) -> list[str]:
        """Spool the upload in full, check the worker holds every step named and every
        path is an output of one of them, then import (one ``nix-store --import`` for a
        batch). A foreign path: nothing is imported and every step named ends aborted,
        without another attempt."""
        drvs = self.require_leases(worker, step_ids)
        outputs = frozenset(path for drv_path in drvs.values()
                            for path in read_derivation(drv_path).output_paths.values())
        limit = self.settings.remote_workers.max_upload_size
        owner = f"step {step_ids[0]}" if len(drvs) == 1 else \
            f"steps {', '.join(str(i) for i in sorted(drvs))}"
        with tempfile.TemporaryFile(prefix="circus-outputs-") as spool:
            spool_upload(stream, spool, limit)
            try:
                verify_export(spool, outputs, owner)
            except ExportRefused as exc:
                reason = str(exc)
                log.warning("remote worker %s: %s", worker.name, reason)
                # what it sent is not what the steps make: no other attempt
                self.holder(worker).finish([StepOutcome(
                    step_id, BuildStatus.aborted, error_message=reason, machine=worker.name,
                    retry=False) for step_id in sorted(drvs)])
                raise PermissionDenied(reason) from None
            return import_file_sync(spool, self.nix_env)

    def fetchable(self, worker: RemoteWorker) -> set[str]:
        """The store paths ``worker`` may substitute from ``/nix-cache`` beyond what
        everyone gets: the input closures of the steps it holds now (``worker_only``
        paths and hidden projects' paths included), nothing else."""
        with self.factory() as session:
            drvs = session.execute(text(
                "SELECT drv_path FROM steps WHERE state = 'running' AND worker = :worker"),
                {"worker": worker.lease_holder}).scalars().all()
        allowed: set[str] = set()
        for drv_path in drvs:
            closure = _INPUT_CLOSURES.get(drv_path)
            if closure is None:
                try:
                    closure = frozenset(store.input_closure(drv_path, self.nix_env))
                except (OSError, ValueError, store.StoreError) as exc:
                    log.warning("cannot read the input closure of %s: %s", drv_path, exc)
                    continue
                _INPUT_CLOSURES.put(drv_path, closure)
            allowed.update(closure)
        return allowed

    # ------------------------------------------------------------ results

    def finish(self, worker: RemoteWorker, report: FinishedStep) -> BuildStatus:
        """Record the worker's outcome through the holder; returns the status recorded."""
        return self.finish_many(worker, [report])[report.step_id]

    def finish_many(self, worker: RemoteWorker, reports: list[FinishedStep]
                    ) -> dict[int, BuildStatus]:
        """Record the outcomes of held steps in one transaction (one check of their
        outputs in the server's store, one publish); returns each step's status."""
        drvs = self.require_leases(worker, [r.step_id for r in reports])
        outcomes: list[StepOutcome] = []
        outputs_of: dict[int, dict[str, str]] = {}
        for report in reports:
            drv_path = drvs[report.step_id]
            status = STATUS_OF_OUTCOME.get(report.outcome)
            outcome = StepOutcome(
                report.step_id, status or BuildStatus.aborted, exit_code=report.exit_code,
                error_message=report.error_message, started_at=_utc(report.started_at),
                finished_at=_utc(report.finished_at), machine=worker.name,
                retry=status is None)
            path = log_path_for(self.settings.logs.log_dir, drv_path, report.step_id)
            size = path.stat().st_size if path.exists() else 0
            final = final_log(path, self.settings.logs.compress)
            if final is not None:
                outcome.log_path, outcome.log_size = str(final), max(size, report.log_bytes)
            if outcome.status in (BuildStatus.succeeded, BuildStatus.failed_with_output):
                outputs_of[report.step_id] = dict(read_derivation(drv_path).output_paths)
            outcomes.append(outcome)
        missing: set[str] = set()
        if outputs_of:
            wanted = [p for outputs in outputs_of.values() for p in outputs.values()]
            try:
                missing = set(store.invalid_paths(wanted, self.nix_env))
            except store.StoreError:
                missing = set(wanted)
        results: dict[int, OutputResult] = {}
        for outcome in outcomes:
            outputs = outputs_of.get(outcome.step_id)
            if outputs is None:
                continue
            if missing.intersection(outputs.values()):
                outcome.status, outcome.retry = BuildStatus.aborted, True
                outcome.error_message = ("the worker reported success but the outputs did "
                                         "not arrive in the server's store")
            else:
                results[outcome.step_id] = read_output_result(outputs)
        recorded = self.holder(worker).finish(outcomes, results)
        if recorded is None:
            raise Conflict(f"step(s) {', '.join(str(o.step_id) for o in outcomes)}: the "
                           "outcome could not be recorded; the leases will lapse")
        for outcome in outcomes:
            log.info("remote worker %s finished step %d: %s", worker.name, outcome.step_id,
                     outcome.status.name)
        return {outcome.step_id: outcome.status for outcome in outcomes}

    def _publish_outputs(self, report: FinishReport) -> None:
        """Sign and publish what the finished builds made (the outputs are in this
        server's store now), as the queue runner's post-processor does."""
        succeeded: Mapping[int, list[str]] = report.builds.succeeded
        if succeeded and not publishes_inline(self.settings):
            publish_later(self.factory, self.settings, sorted(succeeded))
