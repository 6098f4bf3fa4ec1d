"""Projects, jobsets, inputs, channels, members, webhooks, notification configs."""

from __future__ import annotations

import marshmallow as ma
from marshmallow import fields, validate

from circus.common.enums import (
    ChannelMode,
    ForgeType,
    InputType,
    JobsetState,
    MemberRole,
    NotificationType,
    TriggerMode,
)
from circus.projects.service import NAME_RULE
from circus.server.api.schemas.common import Id, PageArgs, Str

NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


def Name(**kwargs: object) -> Str:
    return Str(max_length=128, min_length=1,
               validate=[validate.Regexp(NAME, error=NAME_RULE)], **kwargs)


class ProjectSchema(ma.Schema):
    id = fields.Integer(required=True)
    name = fields.String(required=True)
    description = fields.String(required=True)
    repository_url = fields.String(required=True)
    enabled = fields.Boolean(required=True)
    hidden = fields.Boolean(required=True)
    cache_enabled = fields.Boolean(required=True)
    owner_id = fields.Integer(allow_none=True)
    managed_declaratively = fields.Boolean(required=True)
    created_at = fields.DateTime(required=True)
    updated_at = fields.DateTime(required=True)


class ProjectCreateSchema(ma.Schema):
    name = Name(required=True)
    description = Str(load_default="", max_length=10000)
    repository_url = Str(load_default="", max_length=2048)
    enabled = fields.Boolean(load_default=True)
    hidden = fields.Boolean(load_default=False)
    cache_enabled = fields.Boolean(load_default=True)
    owner_id = Id(allow_none=True, load_default=None)


class ProjectUpdateSchema(ma.Schema):
    name = Name()
    description = Str(max_length=10000)
    repository_url = Str(max_length=2048)
    enabled = fields.Boolean()
    hidden = fields.Boolean()
    cache_enabled = fields.Boolean()
    owner_id = Id(allow_none=True)


class ProjectFilterSchema(PageArgs):
    q = Str(max_length=200, metadata={"description": "substring of the name"})
    enabled = fields.Boolean()


class JobsetSchema(ma.Schema):
    id = fields.Integer(required=True)
    project_id = fields.Integer(required=True)
    name = fields.String(required=True)
    description = fields.String(required=True)
    nix_expression = fields.String(required=True)
    nix_expression_input = fields.String(allow_none=True)
    flake_mode = fields.Boolean(required=True)
    branch = fields.String(allow_none=True)
    enabled = fields.Boolean(required=True)
    state = fields.Enum(JobsetState, by_value=True, required=True)
    trigger_mode = fields.Enum(TriggerMode, by_value=True, required=True)
    check_interval = fields.Integer(required=True)
    scheduling_shares = fields.Integer(required=True)
    keep_nr = fields.Integer(required=True)
    hidden = fields.Boolean(required=True)
    check_reproducibility = fields.Boolean(required=True)
    last_checked_at = fields.DateTime(allow_none=True)
    last_check_outcome = fields.String(allow_none=True)
    error_message = fields.String(allow_none=True)
    managed_declaratively = fields.Boolean(required=True)
    created_at = fields.DateTime(required=True)


_INTERVAL = validate.Range(min=0, max=10**7)
_SHARES = validate.Range(min=1, max=10**6)
_KEEP = validate.Range(min=0, max=10**4)


class JobsetUpdateSchema(ma.Schema):
    name = Name()
    description = Str(max_length=10000)
    nix_expression = Str(max_length=1024, min_length=1)
    nix_expression_input = Str(max_length=128, allow_none=True)
    flake_mode = fields.Boolean()
    branch = Str(max_length=255, allow_none=True)
    enabled = fields.Boolean()
    state = fields.Enum(JobsetState, by_value=True)
    trigger_mode = fields.Enum(TriggerMode, by_value=True)
    check_interval = fields.Integer(validate=_INTERVAL)
    scheduling_shares = fields.Integer(validate=_SHARES)
    keep_nr = fields.Integer(validate=_KEEP)
    hidden = fields.Boolean()
    check_reproducibility = fields.Boolean()


class JobsetCreateSchema(JobsetUpdateSchema):
    name = Name(required=True)


class InputSchema(ma.Schema):
    id = fields.Integer(required=True)
    jobset_id = fields.Integer(required=True)
    name = fields.String(required=True)
    input_type = fields.Enum(InputType, by_value=True, required=True)
    value = fields.String(required=True)
    revision = fields.String(allow_none=True)


class InputCreateSchema(ma.Schema):
    name = Name(required=True)
    input_type = fields.Enum(InputType, by_value=True, required=True)
    value = Str(load_default="", max_length=4096)
    revision = Str(max_length=255, allow_none=True, load_default=None)


class WebhookSchema(ma.Schema):
    id = fields.Integer(required=True)
    project_id = fields.Integer(required=True)
    forge_type = fields.Enum(ForgeType, by_value=True, required=True)
    has_secret = fields.Function(lambda w: w.secret_encrypted is not None,
                                 metadata={"type": "boolean"})
    enabled = fields.Boolean(required=True)
    managed_declaratively = fields.Boolean(required=True)
    created_at = fields.DateTime(required=True)
    url = fields.String(metadata={"description": "where the forge should deliver events"})


class WebhookCreateSchema(ma.Schema):
    forge_type = fields.Enum(ForgeType, by_value=True, required=True)
    secret = Str(max_length=1024, allow_none=True, load_default=None)
    enabled = fields.Boolean(load_default=True)


class NotificationConfigSchema(ma.Schema):
    id = fields.Integer(required=True)
    project_id = fields.Integer(required=True)
    type = fields.Enum(NotificationType, by_value=True, required=True)
    config = fields.Dict(required=True)
    enabled = fields.Boolean(required=True)
    managed_declaratively = fields.Boolean(required=True)
    created_at = fields.DateTime(required=True)


class NotificationConfigCreateSchema(ma.Schema):
    type = fields.Enum(NotificationType, by_value=True, required=True)
    config = fields.Dict(keys=Str(max_length=128), load_default=dict)
    enabled = fields.Boolean(load_default=True)


class MemberSchema(ma.Schema):
    project_id = fields.Integer(required=True)
    user_id = fields.Integer(required=True)
    username = fields.String(required=True)
    role = fields.Enum(MemberRole, by_value=True, required=True)
    managed_declaratively = fields.Boolean(required=True)
    created_at = fields.DateTime(required=True)


class MemberCreateSchema(ma.Schema):
    user_id = Id()
    username = Str(max_length=128)
    role = fields.Enum(MemberRole, by_value=True, load_default=MemberRole.member)

    @ma.validates_schema
    def one_user(self, data: dict[str, object], **kwargs: object) -> None:
        if ("user_id" in data) == ("username" in data):
            raise ma.ValidationError("give exactly one of user_id or username", "user_id")


class ChannelSchema(ma.Schema):
    id = fields.Integer(required=True)
    name = fields.String(required=True)
    project_id = fields.Integer(required=True)
    jobset_id = fields.Integer(required=True)
    evaluation_id = fields.Integer(allow_none=True)
    mode = fields.Enum(ChannelMode, by_value=True, required=True, metadata={
        "description": "manual: moved only by promote; automatic: follows the newest "
                       "evaluation whose builds all succeeded (or whose aggregate_job did)"})
    aggregate_job = fields.String(allow_none=True)
    moved_at = fields.DateTime(allow_none=True)
    managed_declaratively = fields.Boolean(required=True)
    created_at = fields.DateTime(required=True)
    updated_at = fields.DateTime(required=True)


class ChannelCreateSchema(ma.Schema):
    name = Name(required=True)
    jobset_id = Id(required=True)
    mode = fields.Enum(ChannelMode, by_value=True, load_default=ChannelMode.manual)
    aggregate_job = Str(max_length=255, min_length=1, allow_none=True, load_default=None)


class ChannelUpdateSchema(ma.Schema):
    mode = fields.Enum(ChannelMode, by_value=True)
    aggregate_job = Str(max_length=255, min_length=1, allow_none=True)
