"""Numbered pages for long lists: one (bounded) COUNT and one LIMIT/OFFSET query per list."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flask import request
from sqlalchemy.orm import Session

from circus.common.counting import count_rows

#: page numbers beyond this are treated as this (keeps OFFSET inside a bigint)
MAX_PAGE = 1_000_000


@dataclass
class Page:
    items: list[Any]
    total: int
    number: int
    size: int
    #: False: ``total`` is an estimate (see circus.common.counting)
    exact: bool = True

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.size))

    @property
    def has_prev(self) -> bool:
        return self.number > 1

    @property
    def has_next(self) -> bool:
        return self.number < self.pages

    @property
    def first_index(self) -> int:
        return (self.number - 1) * self.size + 1 if self.total else 0

    @property
    def last_index(self) -> int:
        return min(self.total, self.number * self.size)


def page_number(name: str = "page") -> int:
    """The requested page number; anything that is not a sane number is page 1."""
    raw = request.args.get(name, "1")
    if not raw.isdigit() or len(raw) > 7:
        return 1
    return max(1, min(int(raw), MAX_PAGE))


def paginate(session: Session, query: Any, size: int, *, number: int | None = None,
             scalars: bool = True, total: int | None = None) -> Page:
    """A page of ``query``; ``total`` when the caller knows it already (no COUNT)."""
    number = number if number is not None else page_number()
    total, exact = (total, True) if total is not None else count_rows(session, query)
    limited = query.limit(size).offset((number - 1) * size)
    # rows are tuples already (Row.tuple() is deprecated: its warning cost 10 µs a row)
    items: list[Any] = (list(session.scalars(limited)) if scalars
                        else list(session.execute(limited)))
    return Page(items, total, number, size, exact)
