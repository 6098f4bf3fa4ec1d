"""Inputs that read the server's own disk: ``path`` inputs and ``file://`` repositories.

Evaluating them copies a server directory into the store (``path``) or clones
it (``file://``), so naming one is reading the server's files: admins may name
any directory, everyone else only those under ``evaluator.allowed_path_inputs``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from urllib.parse import unquote, urlsplit


def repository_path(url: str) -> str | None:
    """The server path a git URL (``file://``, ``git+file://``, ``/path``) names, else None."""
    url = url.strip()
    if url.startswith("/"):
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    if parts.scheme.lower() in ("file", "git+file"):
        return unquote(parts.path) or "/"
    return None


def git_input_path(value: str) -> str | None:
    """The server path of a git input's value (``<url> [<branch>]``), else None."""
    parts = value.split()
    return repository_path(parts[0]) if parts else None


def is_allowed(path: str, allowed_dirs: Sequence[str]) -> bool:
    """Whether ``path`` (symlinks resolved) lies inside one of ``allowed_dirs``."""
    if not path.startswith("/"):
        return False
    real = os.path.realpath(path)
    for directory in allowed_dirs:
        if not directory.startswith("/"):
            continue
        base = os.path.realpath(directory)
        if real == base or real.startswith(base.rstrip("/") + "/"):
            return True
    return False


def refusal(location: str) -> str:
    """Why a non-admin may not name ``location``."""
    return (f"{location!r} is on the server's disk: only admins may use server paths, or "
            "directories listed in evaluator.allowed_path_inputs")
