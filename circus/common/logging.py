"""Logging set-up for the daemons: text or JSON lines (``tracing.format``)."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

from circus.common.config import Settings
from circus.common.logcontext import KEYS, ContextFilter


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


def setup_logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ContextFilter())
    if settings.tracing.format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s: %(message)s%(context)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.tracing.level.upper())
    # urllib3 logs request paths at DEBUG; a Slack webhook URL's path is its secret
    logging.getLogger("urllib3.connectionpool").setLevel(
        max(logging.INFO, root.level))
