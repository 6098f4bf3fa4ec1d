"""Blueprint, argument parser, path converters and pagination for /api/v1."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flask_smorest
from sqlalchemy import false
from sqlalchemy.orm import Session
from webargs.flaskparser import FlaskParser
from werkzeug.routing import BaseConverter, IntegerConverter, Map

from circus.common.counting import count_rows
from circus.server.api.schemas.common import MAX_ID

PREFIX = "/api/v1"
#: offsets beyond this find the page's first id before reading rows (see paginate)
DEFERRED_OFFSET = 1000


class Parser(FlaskParser):
    # invalid input is a 400 naming the field (SPEC: errors carry the right 4xx)
    DEFAULT_VALIDATION_STATUS = 400


View = Callable[..., Any]
Decorator = Callable[[View], View]


class Blueprint(flask_smorest.Blueprint):  # type: ignore[misc]
    """flask-smorest's blueprint with a 400 parser and typed decorators (for mypy)."""

    ARGUMENTS_PARSER = Parser()

    def get(self, rule: str, **options: Any) -> Decorator:
        return super().get(rule, **options)  # type: ignore[no-any-return]

    def post(self, rule: str, **options: Any) -> Decorator:
        return super().post(rule, **options)  # type: ignore[no-any-return]

    def put(self, rule: str, **options: Any) -> Decorator:
        return super().put(rule, **options)  # type: ignore[no-any-return]

    def delete(self, rule: str, **options: Any) -> Decorator:
        return super().delete(rule, **options)  # type: ignore[no-any-return]

    def arguments(self, schema: Any, **options: Any) -> Decorator:
        return super().arguments(schema, **options)  # type: ignore[no-any-return]

    def response(self, status_code: int, schema: Any = None, **options: Any) -> Decorator:
        return super().response(status_code, schema, **options)  # type: ignore[no-any-return]

    def doc(self, **kwargs: Any) -> Decorator:
        return super().doc(**kwargs)  # type: ignore[no-any-return]


class IdConverter(IntegerConverter):
    """A row id: digits that fit a bigint (anything else is a 404, never a DB error)."""

    def __init__(self, map: Map, *args: Any, **kwargs: Any) -> None:
        super().__init__(map, min=0, max=MAX_ID)


class NameConverter(BaseConverter):
    """A project/jobset/channel reference: a numeric id or a name."""

    regex = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"


def id_schema(converter: Any) -> dict[str, Any]:
    return {"type": "integer", "minimum": 0, "maximum": MAX_ID}


def name_schema(converter: Any) -> dict[str, Any]:
    return {"type": "string", "pattern": "^" + NameConverter.regex + "$",
            "description": "numeric id or name"}


def paginate(session: Session, query: Any, args: dict[str, Any], *,
             scalars: bool = True, cursor_column: Any = None,
             total: int | None = None,
             id_at_offset: Callable[[int], int | None] | None = None) -> dict[str, Any]:
    """One page of ``query`` plus the total count: ``total`` when the caller knows it
    exactly (from a rollup), else counted exactly up to ``EXACT_UP_TO`` rows and
    estimated beyond (``total_exact`` says which).

    With ``cursor_column`` (an id the query is ordered by, descending) the caller
    may pass ``cursor`` instead of ``offset``: keyset pagination, as fast on page
    1000 as on page 1; ``next_cursor`` names the next page. ``id_at_offset`` finds
    the id at a deep offset (``None``: past the end) faster than walking the ids.
    """
    exact = total is not None
    if total is None:
        total, exact = count_rows(session, query)
    cursor = args.get("cursor") if cursor_column is not None else None
    if cursor is not None:
        limited = query.where(cursor_column < cursor).limit(args["limit"])
    elif cursor_column is not None and args["offset"] > DEFERRED_OFFSET:
        # a deep offset walks the ids alone (an index-only scan where an index serves
        # the filters) to the page's first id, then reads the page by keyset: walking
        # whole rows to offset 500,000 read 500,000 of them from the heap
        first = (id_at_offset(args["offset"]) if id_at_offset is not None else
                 session.scalar(query.with_only_columns(cursor_column)
                                .offset(args["offset"]).limit(1)))
        limited = (query.where(cursor_column <= first).limit(args["limit"])
                   if first is not None else query.where(false()))
    else:
        limited = query.limit(args["limit"]).offset(args["offset"])
    rows: list[Any] = list(session.scalars(limited).all() if scalars
                           else session.execute(limited).all())
    page = {"items": rows if scalars else [tuple(row) for row in rows], "total": total,
            "total_exact": exact, "limit": args["limit"],
            "offset": args["offset"] if cursor is None else 0}
    if cursor_column is not None:
        # an entity's or a row's attribute of the cursor column
        full = len(rows) == args["limit"]
        page["next_cursor"] = getattr(rows[-1], cursor_column.key) if full else None
    return page
