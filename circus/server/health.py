"""``GET /health``: database, broker and daemon heartbeats."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flask import Blueprint, jsonify
from flask.typing import ResponseReturnValue
from kombu import Connection
from sqlalchemy import text

from circus import __version__
from circus.common.heartbeat import freshness
from circus.server.context import db_session, settings

blueprint = Blueprint("health", __name__)


def check_broker(url: str | None) -> dict[str, Any]:
    if not url:
        return {"ok": False, "error": "broker.url is not configured"}
    try:
        with Connection(url, connect_timeout=2) as connection:
            connection.ensure_connection(max_retries=1, timeout=2)
        return {"ok": True}
    except Exception as exc:
        return {"ok": False, "error": str(exc)}


def supervisor_status(path: str | None) -> dict[str, Any] | None:
    """Restart counts of ``circus up``'s daemons (its status file), when run by it."""
    if not path:
        return None
    try:
        loaded = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return loaded if isinstance(loaded, dict) else None


@blueprint.get("/health")
def health() -> ResponseReturnValue:
    report: dict[str, Any] = {"version": __version__}
    try:
        session = db_session()
        session.execute(text("SELECT 1"))
        report["database"] = {"ok": True}
        report["daemons"] = freshness(session)
    except Exception as exc:
        report["database"] = {"ok": False, "error": str(exc).splitlines()[0]}
        report["daemons"] = []
    report["broker"] = check_broker(settings().broker.url)
    supervisor = supervisor_status(settings().server.supervisor_status_file)
    if supervisor is not None:
        report["supervisor"] = supervisor
    healthy = report["database"]["ok"] and report["broker"]["ok"]
    report["status"] = "ok" if healthy else "unavailable"
    if healthy and not all(d["fresh"] for d in report["daemons"]):
        report["status"] = "degraded"
    return jsonify(report), 200 if healthy else 503
