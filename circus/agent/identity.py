"""Who an agent is: its machine id and its name."""

from __future__ import annotations

import os
import re
import socket
import uuid
from collections.abc import Mapping
from pathlib import Path


def persistent_machine_id(path: Path) -> str:
    """Read the machine id, creating it on first start (persistent agents keep it)."""
    try:
        existing = path.read_text().strip()
    except FileNotFoundError:
        existing = ""
    if existing:
        return existing
    path.parent.mkdir(parents=True, exist_ok=True)
    machine_id = uuid.uuid4().hex
    tmp = path.with_suffix(".tmp")
    tmp.write_text(machine_id + "\n")
    tmp.replace(path)
    return machine_id


def ephemeral_machine_id() -> str:
    return uuid.uuid4().hex


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:64]


def agent_name(configured: str | None, machine_id: str, ephemeral: bool,
               environ: Mapping[str, str] | None = None) -> str:
    """The configured name, or a unique one.

    Ephemeral agents (GitHub Actions runners) must never collide with a previous
    run of the same workflow: the name carries the run id, the attempt and a
    slice of the fresh machine id.
    """
    environ = os.environ if environ is None else environ
    if ephemeral:
        base = _safe(configured or "ephemeral")
        run_id = environ.get("GITHUB_RUN_ID")
        attempt = environ.get("GITHUB_RUN_ATTEMPT")
        parts = [base]
        if run_id:
            parts.append(_safe(run_id))
            if attempt:
                parts.append(_safe(attempt))
        parts.append(machine_id[:8])
        return "-".join(parts)[:128]
    return _safe(configured or socket.gethostname())[:128] or machine_id[:16]
