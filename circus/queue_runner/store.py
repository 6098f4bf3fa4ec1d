"""Questions the queue runner asks the local Nix store, batched into few processes.

Every call takes many paths at once: starting a Nix process costs more than
answering for hundreds of paths (DESIGN §6).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from circus.common.nix.process import run

#: stay well below ARG_MAX with 100-byte store paths
CHUNK = 2000
TIMEOUT = 600.0

_STORE_PATH = re.compile(r"^\s+(/nix/store/[0-9a-z]{32}-\S+)$")


class StoreError(RuntimeError):
    """Nix could not answer (store unreachable, invalid argument)."""


def _chunks(items: Sequence[str], size: int = CHUNK) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


@dataclass
class Missing:
    """What realising some derivations would do (``nix-store -r --dry-run``)."""

    #: derivations whose outputs are neither valid nor substitutable
    to_build: set[str]
    #: output paths a configured substituter would provide
    to_fetch: set[str]


def parse_dry_run(text: str) -> Missing:
    to_build: set[str] = set()
    to_fetch: set[str] = set()
    target: set[str] | None = None
    for line in text.splitlines():
        if line.startswith(("these ", "this ")):
            if "will be built" in line:
                target = to_build
            elif "will be fetched" in line:
                target = to_fetch
            else:
                target = None
            continue
        match = _STORE_PATH.match(line)
        if match and target is not None:
            target.add(match.group(1))
        elif not line.startswith(" "):
            target = None
    return Missing(to_build, to_fetch)


def missing(drv_paths: Iterable[str], env: Mapping[str, str]) -> Missing:
    """Derivations in the closures of ``drv_paths`` that would have to be built.

    Nix stops at valid outputs and asks the configured substituters, so this
    answers "not valid and not substitutable" for a whole batch in one process.
    """
    drvs = sorted(set(drv_paths))
    result = Missing(set(), set())
    for chunk in _chunks(drvs):
        done = run(["nix-store", "--realise", "--dry-run", *chunk], env=env, timeout=TIMEOUT)
        if done.returncode != 0 or done.timed_out:
            raise StoreError(f"nix-store --realise --dry-run failed: {done.stderr.strip()[-2000:]}")
        part = parse_dry_run(done.stderr)
        result.to_build |= part.to_build
        result.to_fetch |= part.to_fetch
    return result


def invalid_paths(paths: Iterable[str], env: Mapping[str, str]) -> set[str]:
    """The subset of ``paths`` that is not valid in the store."""
    unique = sorted(set(paths))
    invalid: set[str] = set()
    for chunk in _chunks(unique):
        done = run(["nix-store", "--check-validity", "--print-invalid", *chunk], env=env,
                   timeout=TIMEOUT)
        if done.returncode != 0 or done.timed_out:
            raise StoreError(f"nix-store --check-validity failed: {done.stderr.strip()[-2000:]}")
        invalid.update(line.strip() for line in done.stdout.splitlines() if line.strip())
    return invalid


@dataclass(frozen=True)
class PathSize:
    nar_size: int
    closure_size: int


def path_sizes(paths: Iterable[str], env: Mapping[str, str]) -> dict[str, PathSize]:
    """NAR and closure sizes of valid paths (invalid ones are left out)."""
    unique = sorted(set(paths))
    sizes: dict[str, PathSize] = {}
    for chunk in _chunks(unique):
        done = run(["nix", "path-info", "--json", "--closure-size", *chunk], env=env,
                   timeout=TIMEOUT)
        if done.timed_out:
            raise StoreError("nix path-info timed out")
        try:
            entries = json.loads(done.stdout or "[]")
        except json.JSONDecodeError as exc:
            raise StoreError(f"nix path-info printed no JSON: {done.stderr.strip()[-500:]}"
                             ) from exc
        for entry in entries:
            if entry.get("valid", True) and "narSize" in entry:
                sizes[entry["path"]] = PathSize(int(entry["narSize"]),
                                                int(entry.get("closureSize", entry["narSize"])))
    return sizes
