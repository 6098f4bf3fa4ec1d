"""Human tables by default, JSON with --json."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any


class Output:
    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json

    def data(self, value: Any, columns: Sequence[str] | None = None) -> None:
        if self.as_json:
            print(json.dumps(value, indent=2, sort_keys=False, default=str))
        elif isinstance(value, list):
            print(table(value, columns))
        elif isinstance(value, dict):
            print(record(value, columns))
        elif value is not None:
            print(value)

    def message(self, text: str) -> None:
        """Human feedback; on stderr with --json so stdout stays parseable."""
        print(text, file=sys.stderr if self.as_json else sys.stdout, flush=True)

    def progress(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ",".join(_cell(v) for v in value) or "-"
    if isinstance(value, dict):
        return " ".join(f"{k}={_cell(v)}" for k, v in value.items()) or "-"
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def table(rows: list[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    if not rows:
        return "(none)"
    columns = list(columns or rows[0].keys())
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip()
              for r in cells]
    return "\n".join(lines)


def record(row: dict[str, Any], columns: Sequence[str] | None = None) -> str:
    keys = list(columns or row.keys())
    width = max(len(k) for k in keys) if keys else 0
    return "\n".join(f"{k.ljust(width)}  {_cell(row.get(k))}" for k in keys)
