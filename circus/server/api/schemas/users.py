"""Users, login, API keys, starred jobs."""

from __future__ import annotations

import marshmallow as ma
from marshmallow import fields

from circus.common.enums import Role, UserType
from circus.server.api.schemas.common import Id, PageArgs, Str


class UserSchema(ma.Schema):
    id = fields.Integer(required=True)
    username = fields.String(required=True)
    email = fields.String(allow_none=True)
    full_name = fields.String(allow_none=True)
    role = fields.Enum(Role, by_value=True, required=True)
    user_type = fields.Enum(UserType, by_value=True, required=True)
    external_id = fields.String(allow_none=True, metadata={
        "description": "the account at the provider: GitHub user id, LDAP DN"})
    enabled = fields.Boolean(required=True)
    managed_declaratively = fields.Boolean(required=True)
    has_password = fields.Function(lambda u: u.password_hash is not None,
                                   metadata={"type": "boolean"})
    last_login_at = fields.DateTime(allow_none=True)
    created_at = fields.DateTime(required=True)


class UserCreateSchema(ma.Schema):
    username = Str(required=True, max_length=128, min_length=1)
    password = Str(max_length=1024, allow_none=True, load_default=None,
                   metadata={"description": "omit for users that only log in externally"})
    email = Str(max_length=320, allow_none=True, load_default=None)
    full_name = Str(max_length=256, allow_none=True, load_default=None)
    role = fields.Enum(Role, by_value=True, load_default=Role.read_only)
    enabled = fields.Boolean(load_default=True)


class UserUpdateSchema(ma.Schema):
    password = Str(max_length=1024)
    email = Str(max_length=320, allow_none=True)
    full_name = Str(max_length=256, allow_none=True)
    role = fields.Enum(Role, by_value=True)
    enabled = fields.Boolean()


class UserFilterSchema(PageArgs):
    q = Str(max_length=128)
    role = fields.Enum(Role, by_value=True)


class MeSchema(UserSchema):
    project_roles = fields.Dict(keys=fields.String(), values=fields.String(),
                                metadata={"description": "project name → member role"})
    auth = fields.String(metadata={"description": "session or api_key"})


class MeUpdateSchema(ma.Schema):
    email = Str(max_length=320, allow_none=True)
    full_name = Str(max_length=256, allow_none=True)


class PasswordChangeSchema(ma.Schema):
    current_password = Str(required=True, max_length=1024)
    new_password = Str(required=True, max_length=1024)


class LoginSchema(ma.Schema):
    username = Str(required=True, max_length=128)
    password = Str(required=True, max_length=1024)


class LoginResultSchema(ma.Schema):
    user = fields.Nested(UserSchema, required=True)
    csrf_token = fields.String(required=True)


class GithubStartSchema(ma.Schema):
    next = Str(max_length=2048, metadata={"description": "a path on this site to land on"})


class GithubCallbackSchema(ma.Schema):
    """What GitHub appends to the callback URL (more may come: ignored)."""

    class Meta:
        unknown = ma.EXCLUDE

    code = Str(max_length=1024)
    state = Str(max_length=1024)
    error = Str(max_length=256)
    error_description = Str(max_length=1024)


class CsrfSchema(ma.Schema):
    csrf_token = fields.String(required=True)


class ApiKeySchema(ma.Schema):
    id = fields.Integer(required=True)
    name = fields.String(required=True)
    key_prefix = fields.String(required=True)
    role = fields.Enum(Role, by_value=True, required=True)
    owner_id = fields.Integer(allow_none=True)
    managed_declaratively = fields.Boolean(required=True)
    created_at = fields.DateTime(required=True)
    last_used_at = fields.DateTime(allow_none=True)
    revoked_at = fields.DateTime(allow_none=True)


class ApiKeyCreatedSchema(ApiKeySchema):
    key = fields.String(required=True, metadata={"description": "the secret; shown only once"})


class ApiKeyCreateSchema(ma.Schema):
    name = Str(required=True, max_length=128, min_length=1)
    role = fields.Enum(Role, by_value=True, metadata={
        "description": "default: your own role; read-only for a key an admin makes"})
    owner_id = Id(allow_none=True, metadata={
        "description": "admins only; default: you, for an admin no one (a key of no "
                       "owner is listed with `all`, not on the settings page)"})


class ApiKeyFilterSchema(PageArgs):
    all = fields.Boolean(load_default=False, metadata={"description": "admins: every user's"})


class StarredJobSchema(ma.Schema):
    id = fields.Integer(required=True)
    jobset_id = fields.Integer(required=True)
    job_name = fields.String(required=True)
    created_at = fields.DateTime(required=True)


class StarredJobCreateSchema(ma.Schema):
    jobset_id = Id(required=True)
    job_name = Str(required=True, max_length=1024, min_length=1)
