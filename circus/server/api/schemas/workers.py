"""Bodies of /api/v1/workers (remote ``circus-worker`` hosts)."""

from __future__ import annotations

import marshmallow as ma
from marshmallow import fields, validate

from circus.remote_workers.service import HOSTNAME_PATTERN
from circus.server.api.schemas.common import MAX_ID, Str

#: steps one call may name (a worker holds one per slot)
MAX_STEPS = 1024
#: steps one batched upload or report may name (a claim answers at most 64)
MAX_BATCH = 64


def _step_ids(description: str) -> fields.List[int]:
    return fields.List(fields.Integer(strict=True, validate=validate.Range(min=0, max=MAX_ID)),
                       required=True, validate=validate.Length(max=MAX_STEPS),
                       metadata={"description": description})


def _names(description: str) -> fields.List[str]:
    return fields.List(Str(max_length=128, min_length=1), load_default=list,
                       validate=validate.Length(max=64), metadata={"description": description})


class HeartbeatSchema(ma.Schema):
    systems = fields.List(Str(max_length=128, min_length=1), required=True,
                          validate=validate.Length(min=1, max=64),
                          metadata={"description": "systems it builds (`x86_64-linux`)"})
    supported_features = _names("features it supports")
    mandatory_features = _names("features every step it takes must require")
    slots = fields.Integer(load_default=1, validate=validate.Range(min=1, max=1024),
                           metadata={"description": "builds it runs at once"})
    running = fields.Integer(load_default=0, validate=validate.Range(min=0, max=1024),
                             metadata={"description": "builds it runs now"})
    hostname = Str(load_default=None, max_length=255,
                   validate=[validate.Regexp(HOSTNAME_PATTERN)],
                   metadata={"description": "the worker's host name (shown with its "
                                            "heartbeat); default: its name"})
    pid = fields.Integer(load_default=None, validate=validate.Range(min=1, max=2**31 - 1),
                         metadata={"description": "the worker's process id"})


class HeartbeatAnswerSchema(ma.Schema):
    classes = fields.List(fields.String(), required=True,
                          metadata={"description": "known queue classes it can serve: "
                                                   "consume `build.<class>` for each"})
    lease_secs = fields.Integer(required=True,
                                metadata={"description": "a step not renewed this long is "
                                                         "handed to another builder"})
    cache_public_key = fields.String(
        allow_none=True, metadata={"description": "the key `/nix-cache` signs with "
                                                  "(`name:base64`): the worker substitutes "
                                                  "its steps' inputs from there and trusts "
                                                  "this key for them; null when the cache is "
                                                  "not signed (remote builds are refused)"})


class ClaimSchema(ma.Schema):
    queue_class = Str(required=True, max_length=600, min_length=1,
                      metadata={"description": "the class whose wake-up it received"})
    limit = fields.Integer(load_default=1, validate=validate.Range(min=1, max=64),
                           metadata={"description": "steps wanted (its free slots)"})


class ClaimedStepSchema(ma.Schema):
    id = fields.Integer(required=True)
    drv_path = fields.String(required=True)
    queue_class = fields.String(required=True)
    outputs = fields.Dict(keys=fields.String(), values=fields.String(), required=True,
                          metadata={"description": "output name → store path; the only "
                                                   "paths an upload may carry"})
    timeout = fields.Integer(required=True, metadata={"description": "seconds"})
    max_silent = fields.Integer(required=True, metadata={"description": "seconds"})
    max_log_size = fields.Integer(required=True, metadata={"description": "bytes"})
    attempts = fields.Integer(required=True)
    input_closure = fields.List(fields.String(), required=True,
                                metadata={"description": "the .drv closure and its inputs' "
                                                         "outputs, dependencies first: "
                                                         "published in `/nix-cache` for the "
                                                         "worker to substitute"})


class ClaimAnswerSchema(ma.Schema):
    steps = fields.List(fields.Nested(ClaimedStepSchema), required=True)


class StepIdsSchema(ma.Schema):
    step_ids = _step_ids("steps it holds")


class LostSchema(ma.Schema):
    lost = fields.List(fields.Integer(), required=True,
                       metadata={"description": "steps no longer its own: stop their builds"})


class ReleasedSchema(ma.Schema):
    released = fields.List(fields.Integer(), required=True)


class LogAnswerSchema(ma.Schema):
    size = fields.Integer(required=True, metadata={"description": "bytes in the log now"})
    truncated = fields.Boolean(required=True,
                               metadata={"description": "the log cap cut this chunk"})


#: store paths one derivations/missing call may ask about
MAX_QUERY_PATHS = 20_000


def _evaluation() -> fields.Integer:
    return fields.Integer(
        required=True, strict=False, validate=validate.Range(min=1, max=MAX_ID),
        metadata={"description": "the evaluation whose new builds need these derivations: "
                                 "the server roots them (GC) for as long as it roots that "
                                 "evaluation's own"})


class PathsSchema(ma.Schema):
    paths = fields.List(Str(max_length=1024, min_length=1), required=True,
                        validate=validate.Length(min=1, max=MAX_QUERY_PATHS),
                        metadata={"description": "store paths of the .drv closure of an "
                                                 "evaluation's new builds"})
    evaluation = _evaluation()


class MissingSchema(ma.Schema):
    missing = fields.List(fields.String(), required=True,
                          metadata={"description": "those the server's store lacks"})


class DerivationUploadArgs(ma.Schema):
    evaluation = _evaluation()


class ImportedSchema(ma.Schema):
    imported = fields.List(fields.String(), required=True)


OUTCOMES = ("success", "failed", "failed_with_output", "timed_out", "log_limit_exceeded",
            "oom_killed", "aborted", "cancelled", "import_failure", "upload_failure")


class FinishSchema(ma.Schema):
    outcome = fields.String(required=True, validate=validate.OneOf(OUTCOMES))
    exit_code = fields.Integer(load_default=None, allow_none=True,
                               validate=validate.Range(min=-1024, max=1024))
    started_at = fields.Float(load_default=None, allow_none=True,
                              validate=validate.Range(min=0, max=1e11),
                              metadata={"description": "Unix time"})
    finished_at = fields.Float(load_default=None, allow_none=True,
                               validate=validate.Range(min=0, max=1e11))
    error_message = Str(load_default=None, allow_none=True, max_length=4000)
    log_bytes = fields.Integer(load_default=0, validate=validate.Range(min=0, max=2**62))


class FinishAnswerSchema(ma.Schema):
    status = fields.String(required=True, metadata={"description": "the step's status"})


def _distinct(values: list[int]) -> None:
    if len(set(values)) != len(values):
        raise ma.ValidationError("a step is named twice")


class StepsArgs(ma.Schema):
    step = fields.List(fields.Integer(strict=False, validate=validate.Range(min=0, max=MAX_ID)),
                       required=True, validate=[validate.Length(min=1, max=MAX_BATCH), _distinct],
                       metadata={"description": "the held steps whose outputs the stream "
                                                "carries (repeat the parameter)"})


class StepReportSchema(FinishSchema):
    step_id = fields.Integer(strict=True, required=True,
                             validate=validate.Range(min=0, max=MAX_ID))


class FinishManySchema(ma.Schema):
    reports = fields.List(fields.Nested(StepReportSchema), required=True,
                          validate=validate.Length(min=1, max=MAX_BATCH),
                          metadata={"description": "outcomes of held steps"})

    @ma.validates_schema
    def _one_report_per_step(self, data: dict[str, object], **_: object) -> None:
        reports = data.get("reports") or []
        assert isinstance(reports, list)
        _distinct([int(r["step_id"]) for r in reports])


class FinishManyAnswerSchema(ma.Schema):
    statuses = fields.Dict(keys=fields.String(), values=fields.String(), required=True,
                           metadata={"description": "step id → the step's status"})
