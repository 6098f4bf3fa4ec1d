"""Row counts of long lists: exact up to a bound, the planner's estimate beyond it.

An exact ``COUNT(*)`` of a list visits every row it counts: at a million builds the
count of an unfiltered page cost more than the page. Nobody reads "page 1 of
20,001" for its last digit, so lists count exactly up to ``EXACT_UP_TO`` rows (a
bounded walk) and beyond that take the row estimate of the query's plan.
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session
from sqlalchemy.sql.expression import ClauseElement, Executable

#: lists with at most this many rows are counted exactly
EXACT_UP_TO = 10_000


class Explain(Executable, ClauseElement):
    """``EXPLAIN (FORMAT JSON) <statement>``, bound parameters processed as usual."""

    inherit_cache = False

    def __init__(self, statement: Any) -> None:
        self.statement = statement


@compiles(Explain, "postgresql")
def _compile_explain(element: Explain, compiler: Any, **kw: Any) -> str:
    return "EXPLAIN (FORMAT JSON) " + str(compiler.process(element.statement, **kw))


#: an estimate this many times ``EXACT_UP_TO`` is taken without counting at all
TRUSTED_BEYOND = 5


def count_rows(session: Session, query: Any) -> tuple[int, bool]:
    """(rows of ``query``, whether the figure is exact).

    The plan's estimate comes first: when it is far beyond the bound (all builds, a
    status), the bounded count would only confirm it, after walking 10,001 rows.
    """
    unordered = query.order_by(None)
    plan = session.execute(Explain(unordered)).scalar_one()
    if isinstance(plan, str):
        plan = json.loads(plan)
    estimate = int(plan[0]["Plan"]["Plan Rows"])
    if estimate > EXACT_UP_TO * TRUSTED_BEYOND:
        return estimate, False
    counted = int(session.scalar(select(func.count()).select_from(
        unordered.limit(EXACT_UP_TO + 1).subquery())) or 0)
    if counted <= EXACT_UP_TO:
        return counted, True
    return max(estimate, EXACT_UP_TO + 1), False
