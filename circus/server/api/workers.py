"""/api/v1/workers: how ``circus-worker`` hosts (own Nix store, no database password)
claim, renew, log, upload outputs and report (``circus.remote_workers``; their inputs
come from ``/nix-cache``), and how evaluators on other hosts upload the derivations
of their new builds.

Every call carries ``Authorization: Bearer <worker token>`` (a token whose SHA-256
digest is in ``remote_workers.auth_tokens``; not an API key) and
``X-Circus-Worker: <name>``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from flask import current_app, request

from circus.common.errors import InvalidInput
from circus.common.messaging import WORKER_NAME_HEADER
from circus.queue_runner.routing.capabilities import Capabilities
from circus.queue_runner.routing.wakeups import send_wakeups
from circus.remote_workers.derivations import (
    import_derivations,
    missing_paths,
    require_running_evaluation,
)
from circus.remote_workers.service import FinishedStep, RemoteWorker, RemoteWorkers, authenticate
from circus.server.api.base import Blueprint
from circus.server.api.schemas.workers import (
    ClaimAnswerSchema,
    ClaimSchema,
    DerivationUploadArgs,
    FinishAnswerSchema,
    FinishManyAnswerSchema,
    FinishManySchema,
    FinishSchema,
    HeartbeatAnswerSchema,
    HeartbeatSchema,
    ImportedSchema,
    LogAnswerSchema,
    LostSchema,
    MissingSchema,
    PathsSchema,
    ReleasedSchema,
    StepIdsSchema,
    StepsArgs,
)
from circus.server.auth import bearer_token
from circus.server.context import db_session, server_context

log = logging.getLogger(__name__)

blp = Blueprint("workers", __name__, url_prefix="/api/v1/workers",
                description="Remote build workers (circus-worker): claims, leases, logs "
                            "and outputs (inputs: from /nix-cache). Authenticate with "
                            "`Authorization: Bearer <worker token>` and name the worker in "
                            "`X-Circus-Worker`.")

#: a log chunk per call, at most
MAX_LOG_CHUNK = 1024 * 1024
_WORKER_AUTH: list[dict[str, list[str]]] = [{"worker": []}]
_BYTES = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
S = "/steps/<id:step_id>"


def _publish(counts: Mapping[str, int]) -> None:
    """Wake-ups for newly queued dependents (the reconciler repairs a lost one)."""
    app = current_app.extensions.get("celery")
    if app is None or not counts:
        return
    try:
        send_wakeups(app, counts)
    except Exception:
        log.warning("could not publish wake-ups for %s", sorted(counts), exc_info=True)


def _service() -> RemoteWorkers:
    context = server_context()
    return RemoteWorkers(context.settings, context.session_factory, publish=_publish)


def _caller() -> RemoteWorker:
    return authenticate(server_context().settings, bearer_token(),
                        request.headers.get(WORKER_NAME_HEADER))


@blp.post("/heartbeat")
@blp.arguments(HeartbeatSchema)
@blp.response(200, HeartbeatAnswerSchema)
@blp.doc(security=_WORKER_AUTH)
def heartbeat(args: dict[str, Any]) -> Any:
    """Count this worker as a live builder of its systems/features; answers the classes
    to consume."""
    worker = _caller()
    caps = Capabilities(frozenset(args["systems"]), frozenset(args["supported_features"]),
                        frozenset(args["mandatory_features"]))
    service = _service()
    classes = service.heartbeat(worker, caps, args["slots"], args["running"],
                                args["hostname"], args["pid"])
    return {"classes": classes,
            "lease_secs": server_context().settings.queue_runner.lease_secs,
            "cache_public_key": service.cache_public_key()}


@blp.post("/claim")
@blp.arguments(ClaimSchema)
@blp.response(200, ClaimAnswerSchema)
@blp.doc(security=_WORKER_AUTH)
def claim(args: dict[str, Any]) -> Any:
    """Claim queued steps of a class (leased to this worker)."""
    worker = _caller()
    return {"steps": _service().claim(worker, args["queue_class"], args["limit"])}


@blp.post("/renew")
@blp.arguments(StepIdsSchema)
@blp.response(200, LostSchema)
@blp.doc(security=_WORKER_AUTH)
def renew(args: dict[str, Any]) -> Any:
    """Extend the lease of held steps; answers those taken away (cancelled or lapsed)."""
    return {"lost": _service().renew(_caller(), args["step_ids"])}


@blp.post("/release")
@blp.arguments(StepIdsSchema)
@blp.response(200, ReleasedSchema)
@blp.doc(security=_WORKER_AUTH)
def release(args: dict[str, Any]) -> Any:
    """Hand held steps back without counting an attempt (shutdown)."""
    return {"released": _service().release(_caller(), args["step_ids"])}


@blp.post("/leave")
@blp.response(200, ReleasedSchema)
@blp.doc(security=_WORKER_AUTH)
def leave() -> Any:
    """The worker shuts down: every step it holds goes back to the queue (no attempt
    counted) and it stops counting as a live builder."""
    return {"released": _service().leave(_caller())}


@blp.post(S + "/log")
@blp.response(200, LogAnswerSchema)
@blp.doc(security=_WORKER_AUTH, requestBody={"required": True, "content": _BYTES})
def append_log(step_id: int) -> Any:
    """Append raw build output (at most 1 MiB a call) to the step's log."""
    worker = _caller()
    data = request.get_data(cache=False)
    if len(data) > MAX_LOG_CHUNK:
        raise InvalidInput(f"a log chunk is at most {MAX_LOG_CHUNK} bytes")
    size, truncated = _service().append_log(worker, step_id, data)
    return {"size": size, "truncated": truncated}


@blp.put(S + "/outputs")
@blp.response(200, ImportedSchema)
@blp.doc(security=_WORKER_AUTH, requestBody={"required": True, "content": _BYTES})
def outputs(step_id: int) -> Any:
    """Upload the step's outputs as one `nix-store --export` stream. It is read in full
    and imported only when every path in it is an output of the step; otherwise nothing
    is imported and the step ends aborted."""
    worker = _caller()
    request.max_content_length = server_context().settings.remote_workers.max_upload_size
    return {"imported": _service().import_outputs(worker, step_id, request.stream)}


@blp.post(S + "/finish")
@blp.arguments(FinishSchema)
@blp.response(200, FinishAnswerSchema)
@blp.doc(security=_WORKER_AUTH)
def finish(args: dict[str, Any], step_id: int) -> Any:
    """Report the step's outcome; succeeded outputs must have been uploaded (they are
    checked in the server's store, then signed and published by the server)."""
    status = _service().finish(_caller(), FinishedStep(step_id, **args))
    return {"status": status.name}


@blp.put("/outputs")
@blp.arguments(StepsArgs, location="query")
@blp.response(200, ImportedSchema)
@blp.doc(security=_WORKER_AUTH, requestBody={"required": True, "content": _BYTES})
def batch_outputs(args: dict[str, Any]) -> Any:
    """Upload the outputs of several held steps (a claimed batch) as one
    `nix-store --export` stream. Every step named must be leased to this worker (else
    403, nothing read); the stream is read in full and imported only when every path in
    it is an output of one of them; otherwise nothing is imported and every step named
    ends aborted."""
    worker = _caller()
    request.max_content_length = server_context().settings.remote_workers.max_upload_size
    return {"imported": _service().import_outputs_of(worker, args["step"], request.stream)}


@blp.post("/finish")
@blp.arguments(FinishManySchema)
@blp.response(200, FinishManyAnswerSchema)
@blp.doc(security=_WORKER_AUTH)
def finish_many(args: dict[str, Any]) -> Any:
    """Report the outcomes of several held steps (a claimed batch) in one call; every
    step named must be leased to this worker (else 403, nothing recorded)."""
    reports = [FinishedStep(**report) for report in args["reports"]]
    statuses = _service().finish_many(_caller(), reports)
    return {"statuses": {str(step_id): status.name for step_id, status in statuses.items()}}


@blp.post("/derivations/missing")
@blp.arguments(PathsSchema)
@blp.response(200, MissingSchema)
@blp.doc(security=_WORKER_AUTH)
def derivations_missing(args: dict[str, Any]) -> Any:
    """Which paths of an evaluation's .drv closure the server's store lacks (an
    evaluator with its own store uploads those before it commits the builds). The
    .drv files it has already are rooted for the evaluation from now on."""
    _caller()
    require_running_evaluation(db_session(), args["evaluation"])
    return {"missing": missing_paths(server_context().settings, args["paths"],
                                     args["evaluation"])}


@blp.put("/derivations")
@blp.arguments(DerivationUploadArgs, location="query")
@blp.response(200, ImportedSchema)
@blp.doc(security=_WORKER_AUTH, requestBody={"required": True, "content": _BYTES})
def derivations(args: dict[str, Any]) -> Any:
    """Upload .drv files and the sources they name as one `nix-store --export` stream.
    It is read in full and imported only when every path in it is a .drv or a source
    path one of its .drv files references, and every path is the one Nix computes from
    its content (and, for a .drv, its references are exactly its inputs); otherwise
    nothing is imported (403). The .drv files stay rooted on the server as long as the
    evaluation's builds need them, like those of a local evaluation."""
    uploader = _caller()
    require_running_evaluation(db_session(), args["evaluation"])
    settings = server_context().settings
    request.max_content_length = settings.remote_workers.max_upload_size
    return {"imported": import_derivations(settings, uploader, request.stream,
                                           args["evaluation"])}
