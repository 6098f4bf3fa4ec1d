"""Field types and shapes shared by every resource."""

from __future__ import annotations

from typing import Any

import marshmallow as ma
from marshmallow import fields, validate

from circus.common.counting import EXACT_UP_TO, TRUSTED_BEYOND

#: PostgreSQL bigint: larger ids cannot exist, and must not reach the database
MAX_ID = 2**63 - 1
MAX_LIMIT = 500
DEFAULT_LIMIT = 50


def _no_nul(value: str) -> None:
    if "\x00" in value:
        raise ma.ValidationError("must not contain NUL characters")


class Str(fields.String):
    """A string the database can store (no NUL), with an optional length bound."""

    def __init__(self, *, max_length: int = 4096, min_length: int | None = None,
                 **kwargs: Any) -> None:
        validators = list(kwargs.pop("validate", []) or [])
        validators += [_no_nul, validate.Length(min=min_length, max=max_length)]
        super().__init__(validate=validators, **kwargs)


def Id(**kwargs: Any) -> fields.Integer:
    return fields.Integer(strict=False, validate=validate.Range(min=0, max=MAX_ID), **kwargs)


class ErrorSchema(ma.Schema):
    """Every 4xx/5xx body."""

    error = fields.String(required=True, metadata={"description": "what went wrong"})
    details = fields.Raw(allow_none=True,
                         metadata={"description": "field errors or more context"})


class PageArgs(ma.Schema):
    limit = fields.Integer(load_default=DEFAULT_LIMIT,
                           validate=validate.Range(min=1, max=MAX_LIMIT))
    offset = fields.Integer(load_default=0, validate=validate.Range(min=0, max=10**9))


_pages: dict[str, type[ma.Schema]] = {}


def page_of(item: type[ma.Schema]) -> type[ma.Schema]:
    """``{"items": [...], "total": N, "limit": L, "offset": O}`` of ``item``."""
    name = item.__name__.removesuffix("Schema") + "PageSchema"
    if name not in _pages:
        _pages[name] = type(name, (ma.Schema,), {
            "items": fields.List(fields.Nested(item), required=True),
            "total": fields.Integer(required=True, metadata={
                "description": f"number of items; exact up to {EXACT_UP_TO:,}, beyond that "
                               "the database's estimate (see total_exact; an estimate above "
                               f"{EXACT_UP_TO * TRUSTED_BEYOND:,} is not counted at all), "
                               "unless a rollup holds it (lists of builds)"}),
            "total_exact": fields.Boolean(required=True, metadata={
                "description": "whether total is an exact count"}),
            "limit": fields.Integer(required=True),
            "offset": fields.Integer(required=True),
            "next_cursor": fields.Integer(
                allow_none=True, metadata={"description": "pass as `cursor` for the next "
                                           "page (lists ordered by id, newest first)"}),
        })
    return _pages[name]


class CursorPageArgs(PageArgs):
    cursor = fields.Integer(validate=validate.Range(min=0, max=MAX_ID), metadata={
        "description": "keyset pagination: items with an id below this (see next_cursor)"})


class MessageSchema(ma.Schema):
    message = fields.String(required=True)
