"""The environment every Nix call of Circus runs in.

Nix's defaults reach out to the network (cache.nixos.org, the flake registry on
GitHub). Circus pins both through ``NIX_CONFIG``: substituters come from the
``[nix]`` config section (empty means none), and the flake registry is a local
file, so an offline machine never stalls on DNS.

Builds run in Nix's sandbox (:func:`sandbox_options`): a derivation from a pull
request sees only the store paths it depends on and ``sandbox-paths`` (by
default what ``builder = "/bin/sh"`` derivations need of the host, read-only),
no /etc, /var, /home, /run or /tmp of the host, and no network.
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


#: host directories a build sees (read-only) by default: the shell, coreutils
#: and the libraries they link; ``?`` marks a directory that may be missing
DEFAULT_SANDBOX_PATHS = ("/bin", "/usr/bin", "/usr/lib", "/lib?", "/lib64?")


def sandbox_path_problem(entry: str) -> str | None:
    """Why ``entry`` is not a ``sandbox-paths`` entry (``path``, ``target=source``,
    either with a trailing ``?`` for optional), or None."""
    if not entry or any(c.isspace() for c in entry):
        return f"must be a non-empty path without whitespace (got {entry!r})"
    target, _, source = entry.removesuffix("?").partition("=")
    for part in (target, source) if source or "=" in entry else (target,):
        if not part.startswith("/"):
            return f"must be an absolute path or target=source of absolute paths (got {entry!r})"
    return None


def sandbox_options(enabled: bool, paths: Sequence[str] = DEFAULT_SANDBOX_PATHS,
                    ) -> dict[str, str]:
    """nix.conf settings that put every build in Nix's sandbox (or, disabled, outside).

    ``sandbox-fallback = false``: where the sandbox cannot be set up, builds fail
    rather than silently running unsandboxed.
    """
    if not enabled:
        return {"sandbox": "false"}
    return {"sandbox": "true", "sandbox-fallback": "false",
            "sandbox-paths": " ".join(paths)}


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


#: what evaluation's Nix processes keep of the server's environment: where the
#: tools and the store are, locale and TLS roots; nothing of Circus's own
#: configuration (CIRCUS_*, database and broker URLs, keys, tokens) or HOME
EVALUATION_ENV_KEEP = frozenset({
    "PATH", "NIX_CONFIG", "NIX_REMOTE", "NIX_STORE_DIR", "NIX_STATE_DIR", "NIX_LOG_DIR",
    "NIX_CONF_DIR", "NIX_USER_CONF_FILES", "NIX_DAEMON_SOCKET_PATH", "NIX_SSL_CERT_FILE",
    "SSL_CERT_FILE", "TMPDIR", "TZ", "LANG", "LC_ALL", "LC_CTYPE", "LOCALE_ARCHIVE",
})


def evaluation_environ(env: Mapping[str, str], home: Path) -> dict[str, str]:
    """``env`` (a :func:`nix_environ` result) scrubbed for Nix running untrusted code.

    Only :data:`EVALUATION_ENV_KEEP` survives; ``HOME`` (Nix's caches) is ``home``,
    and the search path is empty (``NIX_PATH`` and nix.conf's ``nix-path``), so the
    expression sees only the ``-I`` entries of its inputs.
    """
    scrubbed = {key: value for key, value in env.items() if key in EVALUATION_ENV_KEEP}
    scrubbed["HOME"] = str(home)
    scrubbed["XDG_CACHE_HOME"] = str(home / ".cache")
    scrubbed["NIX_PATH"] = ""
    inherited = scrubbed.get("NIX_CONFIG")
    scrubbed["NIX_CONFIG"] = f"{inherited}\nnix-path =" if inherited else "nix-path ="
    return scrubbed


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
