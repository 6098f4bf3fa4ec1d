"""``GET /health``: database, broker and daemon heartbeats.

Everyone gets the status (load balancers and ``circus up`` probe it without
credentials). The details an attacker would use to map the installation (daemon
host names and versions, the database's and broker's error texts, which name
hosts and accounts, the supervisor's restarts) only go to callers who may view
``health_details`` (``server.page_access``; admins by default).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flask import Blueprint, jsonify
from flask.typing import ResponseReturnValue
from kombu import Connection
from sqlalchemy import text

from circus import __version__
from circus.auth.actor import Actor
from circus.common.heartbeat import freshness
from circus.server.auth import current_actor
from circus.server.context import db_session, settings
from circus.server.dashboard.access import may_view

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
    if not may_view(_caller(), "health_details"):
        report = _status_only(report)
    return jsonify(report), 200 if healthy else 503


#: what a daemon row shows to callers without ``health_details``
PUBLIC_DAEMON_FIELDS = ("service", "kind", "fresh", "age_seconds")


def _caller() -> Actor:
    """The caller; anonymous when it cannot be told (the database is down)."""
    try:
        return current_actor()
    except Exception:
        return Actor.anonymous()


def _status_only(report: dict[str, Any]) -> dict[str, Any]:
    return {
        "version": report["version"],
        "status": report["status"],
        "database": {"ok": report["database"]["ok"]},
        "broker": {"ok": report["broker"]["ok"]},
        "daemons": [{key: daemon[key] for key in PUBLIC_DAEMON_FIELDS}
                    for daemon in report["daemons"]],
    }
