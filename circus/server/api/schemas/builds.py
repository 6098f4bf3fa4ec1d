"""Evaluations, builds, steps, products."""

from __future__ import annotations

import marshmallow as ma
from marshmallow import fields, validate

from circus.common.enums import BuildStatus, EvaluationStatus, StepState, TriggerKind
from circus.server.api.schemas.common import CursorPageArgs, Id, Str


class EvalErrorSchema(ma.Schema):
    job_name = fields.String(required=True)
    message = fields.String(required=True)


class EvaluationSchema(ma.Schema):
    id = fields.Integer(required=True)
    jobset_id = fields.Integer(required=True)
    project_id = fields.Integer(attribute="jobset.project_id")
    status = fields.Enum(EvaluationStatus, by_value=True, required=True)
    trigger_kind = fields.Enum(TriggerKind, by_value=True, required=True)
    commit_hash = fields.String(allow_none=True)
    inputs_hash = fields.String(allow_none=True)
    flake_ref = fields.String(allow_none=True)
    created_at = fields.DateTime(required=True)
    started_at = fields.DateTime(allow_none=True)
    finished_at = fields.DateTime(allow_none=True)
    eval_time = fields.Float(allow_none=True)
    attrs_total = fields.Integer(allow_none=True)
    attrs_done = fields.Integer(allow_none=True)
    builds_new = fields.Integer(allow_none=True)
    builds_reused = fields.Integer(allow_none=True)
    error_message = fields.String(allow_none=True)
    requested_by = fields.String(allow_none=True)
    pr_number = fields.Integer(allow_none=True)
    pr_head_branch = fields.String(allow_none=True)
    pr_base_branch = fields.String(allow_none=True)
    pr_action = fields.String(allow_none=True)
    build_counts = fields.Dict(keys=fields.String(), values=fields.Integer(),
                               metadata={"description": "builds of the evaluation by status"})


class EvaluationDetailSchema(EvaluationSchema):
    errors = fields.List(fields.Nested(EvalErrorSchema), required=True)
    stderr_tail = fields.String(allow_none=True)
    inputs = fields.Dict()


class EvaluationFilterSchema(CursorPageArgs):
    project_id = Id()
    jobset_id = Id()
    status = fields.Enum(EvaluationStatus, by_value=True)
    trigger_kind = fields.Enum(TriggerKind, by_value=True)


class TriggerSchema(ma.Schema):
    jobset_id = Id()
    project = Str(max_length=128, metadata={"description": "project id or name (with jobset)"})
    jobset = Str(max_length=128, metadata={"description": "jobset name (with project)"})

    @ma.validates_schema
    def one_jobset(self, data: dict[str, object], **kwargs: object) -> None:
        if "jobset_id" not in data and not ("project" in data and "jobset" in data):
            raise ma.ValidationError("give jobset_id, or project and jobset", "jobset_id")


class CompareArgsSchema(ma.Schema):
    to = Id(required=True, metadata={"description": "the evaluation to compare against"})


class ComparisonSchema(ma.Schema):
    evaluation_id = fields.Integer(required=True)
    other_id = fields.Integer(required=True)
    new_jobs = fields.List(fields.String(), required=True)
    removed_jobs = fields.List(fields.String(), required=True)
    changed_jobs = fields.List(fields.String(), required=True)
    unchanged_count = fields.Integer(required=True)


class BuildSchema(ma.Schema):
    id = fields.Integer(required=True)
    evaluation_id = fields.Integer(required=True)
    jobset_id = fields.Integer(required=True)
    project_id = fields.Integer(required=True)
    job_name = fields.String(required=True)
    nix_name = fields.String(allow_none=True)
    drv_path = fields.String(required=True)
    system = fields.String(required=True)
    status = fields.Enum(BuildStatus, required=True)
    status_code = fields.Function(lambda b: int(b.status), required=True,
                                  metadata={"type": "integer"})
    finished = fields.Function(lambda b: b.status.is_finished, metadata={"type": "boolean"})
    outputs = fields.Dict(keys=fields.String(), values=fields.String(), attribute="output_map",
                          required=True)
    required_features = fields.List(fields.String(), required=True)
    is_aggregate = fields.Boolean(required=True)
    is_fod = fields.Boolean(required=True)
    priority = fields.Integer(required=True)
    retry_count = fields.Integer(required=True)
    created_at = fields.DateTime(required=True)
    started_at = fields.DateTime(allow_none=True)
    completed_at = fields.DateTime(allow_none=True)
    error_message = fields.String(allow_none=True)
    keep = fields.Boolean(required=True)
    signed = fields.Boolean(required=True)
    closure_size = fields.Integer(allow_none=True)
    machine = fields.String(allow_none=True)
    meta_description = fields.String(allow_none=True)
    meta_license = fields.String(allow_none=True)
    meta_homepage = fields.String(allow_none=True)
    meta_maintainers = fields.String(allow_none=True)


class BuildFilterSchema(CursorPageArgs):
    project_id = Id()
    jobset_id = Id()
    evaluation_id = Id()
    job_name = Str(max_length=1024)
    status = fields.Enum(BuildStatus)
    system = Str(max_length=128)
    finished = fields.Boolean()


class RecentArgsSchema(ma.Schema):
    limit = fields.Integer(load_default=20, validate=validate.Range(min=1, max=200))
    project_id = Id()
    jobset_id = Id()


class StatsArgsSchema(ma.Schema):
    project_id = Id()
    jobset_id = Id()


class BuildStatsSchema(ma.Schema):
    total = fields.Integer(required=True)
    by_status = fields.Dict(keys=fields.String(), values=fields.Integer(), required=True)
    queued = fields.Integer(required=True)
    running = fields.Integer(required=True)
    finished = fields.Integer(required=True)
    succeeded = fields.Integer(required=True)
    failed = fields.Integer(required=True)
    avg_duration_seconds = fields.Float(allow_none=True)
    steps_by_state = fields.Dict(keys=fields.String(), values=fields.Integer(), required=True)


class StepSchema(ma.Schema):
    id = fields.Integer(required=True, attribute="step_id")
    build_id = fields.Integer(required=True)
    step_nr = fields.Integer(required=True)
    drv_path = fields.String(required=True)
    is_toplevel = fields.Boolean(required=True)
    state = fields.Enum(StepState, by_value=True, required=True)
    status = fields.Enum(BuildStatus, allow_none=True)
    system = fields.String(required=True)
    machine = fields.String(allow_none=True)
    exit_code = fields.Integer(allow_none=True)
    error_message = fields.String(allow_none=True)
    propagated_from_step_id = fields.Integer(allow_none=True)
    started_at = fields.DateTime(allow_none=True)
    completed_at = fields.DateTime(allow_none=True, attribute="finished_at")
    log_size = fields.Integer(allow_none=True)
    has_log = fields.Boolean(required=True)
    depends_on = fields.List(fields.Integer(), metadata={
        "description": "ids of this build's steps this step waited on (the graph's edges)"})


class FailureSchema(ma.Schema):
    failed_step = fields.Nested(StepSchema, required=True, metadata={
        "description": "the step whose failure failed the build"})
    path = fields.List(fields.Nested(StepSchema), required=True, metadata={
        "description": "the build's own step first, down the edges to the failed step"})
    machine = fields.String(allow_none=True, metadata={
        "description": "where the failed step ran"})
    log_tail = fields.String(allow_none=True, metadata={
        "description": "the end of the failed step's log (None: it wrote none)"})
    log_truncated = fields.Boolean(required=True)


class ProductSchema(ma.Schema):
    id = fields.Integer(required=True)
    build_id = fields.Integer(required=True)
    type = fields.String(required=True)
    subtype = fields.String(required=True)
    name = fields.String(required=True)
    path = fields.String(required=True)
    default_path = fields.String(allow_none=True)
    sha256 = fields.String(allow_none=True)
    file_size = fields.Integer(allow_none=True)
    content_type = fields.String(allow_none=True)
    is_directory = fields.Boolean(required=True)


class DownloadArgsSchema(ma.Schema):
    path = Str(max_length=4096, metadata={
        "description": "file inside a directory product (default: its default_path)"})


class LogArgsSchema(ma.Schema):
    step = Id(metadata={"description": "step id (default: the build's top-level step)"})
