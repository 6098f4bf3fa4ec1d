"""Logging set-up for the daemons and the agent: text or JSON lines (``tracing``).

No server imports here: the agent configures its logging with this module too.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

from circus.common.configbase import Problem, SettingsModel
from circus.common.logcontext import KEYS, ContextFilter


class TracingSettings(SettingsModel):
    level: str = "INFO"
    format: str = "text"

    def problems(self) -> list[Problem]:
        found = []
        if self.level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            found.append(Problem("level", f"must be one of debug, info, warning, error, critical"
                                          f" (got {self.level!r})"))
        if self.format not in ("text", "json"):
            found.append(Problem("format", f"must be text or json (got {self.format!r})"))
        return found


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in KEYS:
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(tracing: TracingSettings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ContextFilter())
    if tracing.format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s: %(message)s%(context)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(tracing.level.upper())
    # urllib3 logs request paths at DEBUG; a Slack webhook URL's path is its secret
    logging.getLogger("urllib3.connectionpool").setLevel(
        max(logging.INFO, root.level))
