"""Prometheus's own checker (``promtool``, Debian package ``prometheus``)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    found = shutil.which("promtool")
    assert found, "promtool is missing (scripts/setup-system.sh installs Debian's prometheus)"
    return subprocess.run([found, *args], input=stdin, capture_output=True, text=True,
                          timeout=60, cwd=Path(__file__).parent)


def metric_types(exposition: str) -> dict[str, str]:
    """``# TYPE`` of every family in a text exposition, by name."""
    return dict(re.findall(r"^# TYPE (\S+) (\S+)$", exposition, re.M))
