"""What the local Nix store knows about paths (``nix path-info --json``)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from circus.common.nix import process
from circus.common.nix.hashes import Sha256


class PathInfoError(RuntimeError):
    pass


@dataclass(frozen=True)
class PathInfo:
    path: str
    nar_hash: str  # sha256:<base32>
    nar_size: int
    references: tuple[str, ...]
    deriver: str | None
    ca: str | None


def invalid_paths(paths: Sequence[str], env: Mapping[str, str]) -> list[str]:
    done = process.run(["nix-store", "--check-validity", "--print-invalid", *paths],
                       env=env, timeout=300)
    if done.returncode != 0:
        raise PathInfoError(f"nix-store --check-validity failed: {done.stderr.strip()}")
    return done.stdout.split()


def closure(paths: Sequence[str], env: Mapping[str, str]) -> list[PathInfo]:
    """Every path in the closure of ``paths`` (which must be valid), with its NAR facts."""
    if not paths:
        return []
    done = process.run(["nix", "path-info", "--json", "--recursive", *paths], env=env,
                       timeout=600)
    if done.returncode != 0:
        raise PathInfoError(f"nix path-info failed: {done.stderr.strip()}")
    try:
        entries = json.loads(done.stdout)
        return [PathInfo(
            path=entry["path"],
            nar_hash=Sha256.parse(entry["narHash"]).nix,
            nar_size=int(entry["narSize"]),
            references=tuple(sorted(entry.get("references") or [])),
            deriver=entry.get("deriver") or None,
            ca=entry.get("ca") or None,
        ) for entry in entries]
    except (ValueError, KeyError, TypeError) as exc:
        raise PathInfoError(f"unexpected nix path-info output: {exc}") from None
