"""Builders, agent sessions, notification tasks, audit log, system, config, news, search."""

from __future__ import annotations

import marshmallow as ma
from marshmallow import fields, validate

from circus.common.enums import ActorKind, AuthKind, NotificationTaskStatus, NotificationType
from circus.server.api.schemas.common import PageArgs, Str


class BuilderSchema(ma.Schema):
    id = fields.Integer(required=True)
    name = fields.String(required=True)
    ssh_uri = fields.String(required=True)
    systems = fields.List(fields.String(), required=True)
    max_jobs = fields.Integer(required=True)
    speed_factor = fields.Float(required=True)
    supported_features = fields.List(fields.String(), required=True)
    mandatory_features = fields.List(fields.String(), required=True)
    ssh_key_file = fields.String(allow_none=True)
    public_host_key = fields.String(allow_none=True)
    enabled = fields.Boolean(required=True)
    consecutive_failures = fields.Integer(required=True)
    disabled_until = fields.DateTime(allow_none=True)
    last_failure = fields.String(allow_none=True)
    managed_declaratively = fields.Boolean(required=True)
    created_at = fields.DateTime(required=True)
    #: steps building on it now (all queue runners)
    current_jobs = fields.Integer(required=True)


_FEATURES = fields.List(Str(max_length=128, min_length=1), validate=validate.Length(max=128))
_SYSTEMS = fields.List(Str(max_length=128, min_length=1), validate=validate.Length(min=1, max=32))


class BuilderUpdateSchema(ma.Schema):
    ssh_uri = Str(max_length=2048, min_length=1)
    systems = _SYSTEMS
    max_jobs = fields.Integer(validate=validate.Range(min=1, max=10**4))
    speed_factor = fields.Float(validate=validate.Range(min=0.001, max=10**6))
    supported_features = _FEATURES
    mandatory_features = _FEATURES
    ssh_key_file = Str(max_length=4096, allow_none=True)
    public_host_key = Str(max_length=8192, allow_none=True)
    enabled = fields.Boolean()


class BuilderCreateSchema(BuilderUpdateSchema):
    name = Str(required=True, max_length=128, min_length=1,
               validate=[validate.Regexp(r"^[A-Za-z0-9][A-Za-z0-9._@:-]*$")])
    ssh_uri = Str(required=True, max_length=2048, min_length=1)


class BuilderSessionSchema(ma.Schema):
    id = fields.Integer(required=True)
    machine_id = fields.String(required=True)
    name = fields.String(required=True)
    hostname = fields.String(required=True)
    systems = fields.List(fields.String(), required=True)
    supported_features = fields.List(fields.String(), required=True)
    mandatory_features = fields.List(fields.String(), required=True)
    speed_factor = fields.Float(required=True)
    cpu_count = fields.Integer(required=True)
    max_jobs = fields.Integer(required=True)
    proto_version = fields.Integer(required=True)
    ephemeral = fields.Boolean(required=True)
    auth_kind = fields.Enum(AuthKind, by_value=True, required=True)
    pool = fields.String(allow_none=True)
    connected = fields.Boolean(required=True)
    connected_at = fields.DateTime(allow_none=True)
    disconnected_at = fields.DateTime(allow_none=True)
    last_seen = fields.DateTime(allow_none=True)
    current_jobs = fields.Integer(required=True)
    load1 = fields.Float(allow_none=True)
    load5 = fields.Float(allow_none=True)
    load15 = fields.Float(allow_none=True)
    mem_total = fields.Integer(allow_none=True)
    mem_used = fields.Integer(allow_none=True)
    store_free = fields.Integer(allow_none=True)
    build_dir_free = fields.Integer(allow_none=True)
    cpu_psi_avg10 = fields.Float(allow_none=True)
    mem_psi_avg10 = fields.Float(allow_none=True)
    io_psi_avg10 = fields.Float(allow_none=True)
    builds_succeeded = fields.Integer(required=True)
    builds_failed = fields.Integer(required=True)
    consecutive_failures = fields.Integer(required=True)
    disabled_until = fields.DateTime(allow_none=True)


class SessionFilterSchema(PageArgs):
    connected = fields.Boolean()


class NotificationTaskSchema(ma.Schema):
    id = fields.Integer(required=True)
    type = fields.Enum(NotificationType, by_value=True, required=True)
    status = fields.Enum(NotificationTaskStatus, by_value=True, required=True)
    attempts = fields.Integer(required=True)
    max_attempts = fields.Integer(required=True)
    next_retry_at = fields.DateTime(allow_none=True)
    last_error = fields.String(allow_none=True)
    build_id = fields.Integer(allow_none=True)
    config_id = fields.Integer(allow_none=True)
    created_at = fields.DateTime(required=True)
    completed_at = fields.DateTime(allow_none=True)


class NotificationTaskFilterSchema(PageArgs):
    status = fields.Enum(NotificationTaskStatus, by_value=True)
    type = fields.Enum(NotificationType, by_value=True)


class AuditLogSchema(ma.Schema):
    id = fields.Integer(required=True)
    at = fields.DateTime(required=True)
    actor_kind = fields.Enum(ActorKind, by_value=True, required=True)
    actor = fields.String(allow_none=True)
    action = fields.String(required=True)
    target = fields.String(allow_none=True)
    details = fields.Dict(required=True)
    remote_addr = fields.String(allow_none=True)


class AuditFilterSchema(PageArgs):
    action = Str(max_length=128)
    actor = Str(max_length=256)
    target = Str(max_length=512)


class SystemSchema(ma.Schema):
    version = fields.String(required=True)
    database = fields.Dict(required=True)
    counts = fields.Dict(keys=fields.String(), values=fields.Integer(), required=True)
    daemons = fields.List(fields.Dict(), required=True)
    settings = fields.Dict(required=True)


class ConfigSchema(ma.Schema):
    config = fields.Dict(required=True, metadata={"description": "effective settings, "
                                                  "secrets redacted"})
    editable = fields.Boolean(required=True)
    config_file = fields.String(allow_none=True)


class ConfigUpdateSchema(ma.Schema):
    toml = Str(required=True, max_length=1024 * 1024,
               metadata={"description": "the complete new configuration file"})


class ConfigUpdateResultSchema(ma.Schema):
    written = fields.String(required=True)
    declarative = fields.Dict(required=True)
    restart_required = fields.Boolean(required=True)


class NewsSchema(ma.Schema):
    id = fields.Integer(required=True)
    title = fields.String(required=True)
    contents = fields.String(required=True)
    author_id = fields.Integer(allow_none=True)
    created_at = fields.DateTime(required=True)


class NewsCreateSchema(ma.Schema):
    title = Str(load_default="", max_length=256)
    contents = Str(required=True, max_length=100000, min_length=1)


class SearchArgsSchema(ma.Schema):
    q = Str(required=True, max_length=256, min_length=1)
    limit = fields.Integer(load_default=20, validate=validate.Range(min=1, max=100))


class SearchHitSchema(ma.Schema):
    kind = fields.String(required=True)
    id = fields.Integer(allow_none=True)
    name = fields.String(required=True)
    project_id = fields.Integer(allow_none=True)
    jobset_id = fields.Integer(allow_none=True)
    build_id = fields.Integer(allow_none=True)


class SearchResultSchema(ma.Schema):
    query = fields.String(required=True)
    projects = fields.List(fields.Nested(SearchHitSchema), required=True)
    jobsets = fields.List(fields.Nested(SearchHitSchema), required=True)
    jobs = fields.List(fields.Nested(SearchHitSchema), required=True)
    builds = fields.List(fields.Nested(SearchHitSchema), required=True)
    store_paths = fields.List(fields.Nested(SearchHitSchema), required=True)


class SystemMetricSchema(ma.Schema):
    system = fields.String(required=True)
    pending = fields.Integer(required=True)
    running = fields.Integer(required=True)
    succeeded = fields.Integer(required=True)
    failed = fields.Integer(required=True)
    machines = fields.Integer(required=True)


class SystemsMetricsSchema(ma.Schema):
    systems = fields.List(fields.Nested(SystemMetricSchema), required=True)


class TimeseriesArgsSchema(ma.Schema):
    days = fields.Integer(load_default=14, validate=validate.Range(min=1, max=366))
    bucket = Str(load_default="day", validate=[validate.OneOf(["hour", "day", "week"])])
    project_id = fields.Integer(validate=validate.Range(min=0, max=2**63 - 1))
    jobset_id = fields.Integer(validate=validate.Range(min=0, max=2**63 - 1))


class TimeseriesPointSchema(ma.Schema):
    t = fields.DateTime(required=True)
    values = fields.Dict(keys=fields.String(), values=fields.Float(), required=True)


class TimeseriesSchema(ma.Schema):
    bucket = fields.String(required=True)
    series = fields.List(fields.Nested(TimeseriesPointSchema), required=True)
