"""The environment every Nix call of Circus runs in.

Nix's defaults reach out to the network (cache.nixos.org, the flake registry on
GitHub). Circus pins both through ``NIX_CONFIG``: substituters come from the
``[nix]`` config section (empty means none), and the flake registry is a local
file, so an offline machine never stalls on DNS.
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

EMPTY_REGISTRY = {"flakes": [], "version": 2}


def default_registry_path() -> Path:
    path = Path(tempfile.gettempdir()) / "circus-flake-registry.json"
    if not path.exists():
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(EMPTY_REGISTRY))
        tmp.replace(path)
    return path


def nix_config_text(
    substituters: Sequence[str] | None,
    trusted_public_keys: Sequence[str] | None = None,
    flake_registry: str | None = None,
    extra: Mapping[str, str] | None = None,
) -> str:
    lines = ["extra-experimental-features = nix-command flakes",
             f"flake-registry = {flake_registry or default_registry_path()}"]
    if substituters is not None:
        lines.append(f"substituters = {' '.join(substituters)}")
    if trusted_public_keys is not None:
        lines.append(f"trusted-public-keys = {' '.join(trusted_public_keys)}")
    for key, value in (extra or {}).items():
        lines.append(f"{key} = {value}")
    return "\n".join(lines)


def nix_environ(
    substituters: Sequence[str] | None,
    trusted_public_keys: Sequence[str] | None = None,
    flake_registry: str | None = None,
    extra: Mapping[str, str] | None = None,
    base: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """A copy of ``base`` (default: this process's env) with Circus's NIX_CONFIG."""
    env = dict(os.environ if base is None else base)
    text = nix_config_text(substituters, trusted_public_keys, flake_registry, extra)
    inherited = env.get("NIX_CONFIG")
    env["NIX_CONFIG"] = f"{inherited}\n{text}" if inherited else text
    return env


@functools.cache
def nix_version() -> tuple[int, int, int]:
    out = subprocess.run(["nix-store", "--version"], capture_output=True, text=True,
                         check=True).stdout
    match = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", out)
    if not match:
        raise RuntimeError(f"cannot read the Nix version from {out!r}")
    return int(match.group(1)), int(match.group(2)), int(match.group(3) or 0)


@functools.cache
def current_system() -> str:
    out = subprocess.run(
        ["nix-instantiate", "--eval", "--expr", "builtins.currentSystem", "--json"],
        capture_output=True, text=True, check=True, env=nix_environ([]),
    ).stdout
    return str(json.loads(out))


def system_features_from_nix_conf(path: Path = Path("/etc/nix/nix.conf")) -> list[str] | None:
    """``system-features`` of nix.conf, or None when it is not set there."""
    try:
        text = path.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() in ("system-features", "extra-system-features"):
            return value.split()
    return None


#: Nix's own default when nix.conf says nothing
DEFAULT_SYSTEM_FEATURES = ["nixos-test", "benchmark", "big-parallel"]
