"""What Circus asks the local Nix store: the commands, and how their output is read.

Both front ends (:mod:`circus.common.nix.store` for threads,
:mod:`circus.common.nix.store.aio` for asyncio) run the :class:`Query` objects
built here, so every argument list and every parser exists once.

Nix has printed ``nix path-info --json`` in three shapes (see
``tests/fixtures/nix-path-info/README.md``), all read by :func:`parse_path_info`:

- Nix 2.8 to 2.18: a list of objects with a ``path`` key; an invalid path is
  ``{"path": …, "valid": false}``;
- Nix 2.19 and later: an object keyed by store path; an invalid path is ``null``;
- JSON format version 2 (``--json-format 2``, after Nix 2.32): the objects sit
  under ``"info"``, keyed by base name (``<hash>-<name>``); references and
  deriver are base names too, ``ca`` is ``{"method", "hash"}``, and a hash may
  be ``{"algorithm", "format", "hash"}`` instead of a string. Plain ``--json``
  (what Circus passes: Nix 2.8 knows no ``--json-format``) still prints the
  2.19 shape there, with a deprecation warning on stderr.

No database imports: the agent uses this package.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from circus.common.nix import base32, storepath
from circus.common.nix.hashes import Sha256

#: paths per command: stays well below ARG_MAX with 100-byte store paths
CHUNK = 2000

Part = TypeVar("Part")
Answer = TypeVar("Answer")


class StoreError(RuntimeError):
    """Nix could not answer (store unreachable, invalid argument, unreadable output)."""


def checked_paths(paths: Iterable[str]) -> list[str]:
    """``paths`` as a list, each one checked to be a store path.

    Every path handed to a Nix command goes through here and then after ``--``:
    paths come from the other side of the agent protocol, and ``--option …`` or
    ``/etc/passwd`` must never reach an argument list.
    """
    found = list(paths)
    for path in found:
        if not storepath.is_store_path(path):
            raise StoreError(f"refused: {path[:200]!r} is not a store path")
    return found


def _unique(paths: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(checked_paths(paths)))


def _chunks(items: Sequence[str], size: int = CHUNK) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


@dataclass(frozen=True)
class Query(Generic[Part, Answer]):
    """Nix commands (one per chunk of paths) and how their outputs make one answer.

    A command that exits non-zero or times out raises :class:`StoreError`.
    """

    argvs: list[list[str]]
    #: one command's output (stdout, or stderr when ``reads_stderr``) → its part
    parse: Callable[[str], Part]
    combine: Callable[[list[Part]], Answer]
    reads_stderr: bool = False


def failed(argv: Sequence[str], stderr: str) -> StoreError:
    return StoreError(f"{_command(argv)} failed: {stderr.strip()[-2000:]}")


def timed_out(argv: Sequence[str], seconds: float) -> StoreError:
    return StoreError(f"{_command(argv)} timed out after {seconds:.0f} s")


def _command(argv: Sequence[str]) -> str:
    """``nix-store --check-validity``: the command and its first option, for messages."""
    return " ".join(argv[:2])


def _lines(text: str) -> list[str]:
    return text.split()


# ---------------------------------------------------------------------- validity


def invalid_paths(paths: Iterable[str]) -> Query[list[str], list[str]]:
    """The paths of ``paths`` that are not valid in the store (first-seen order, once each)."""
    wanted = _unique(paths)

    def combine(parts: list[list[str]]) -> list[str]:
        invalid = {p for part in parts for p in part}
        return [p for p in wanted if p in invalid]

    return Query([["nix-store", "--check-validity", "--print-invalid", "--", *chunk]
                  for chunk in _chunks(wanted)], _lines, combine)


# ---------------------------------------------------------------------- build logs


def build_log_argv(drv_path: str) -> list[str]:
    """``nix-store --read-log``: the log Nix kept of the build of ``drv_path``."""
    return ["nix-store", "--read-log", "--", *checked_paths([drv_path])]


def kept_log(argv: Sequence[str], returncode: int, stdout: bytes, stderr: bytes
             ) -> bytes | None:
    """What :func:`build_log_argv` answered: the log, or None when Nix kept none."""
    if returncode == 0:
        return stdout
    text = stderr.decode(errors="replace")
    if "is not available" in text:
        return None
    raise failed(argv, text)


# ---------------------------------------------------------------------- closures


def _concat_unique(parts: list[list[str]]) -> list[str]:
    # each part lists dependencies first; a path already listed by an earlier part
    # keeps its earlier place, which is still before everything that needs it
    return list(dict.fromkeys(p for part in parts for p in part))


def requisites(paths: Iterable[str], include_outputs: bool = False
               ) -> Query[list[str], list[str]]:
    """The closure of ``paths`` (``nix-store --query --requisites``), dependencies first."""
    flags = ["--include-outputs"] if include_outputs else []
    return Query([["nix-store", "--query", "--requisites", *flags, "--", *chunk]
                  for chunk in _chunks(_unique(paths))], _lines, _concat_unique)


def without_own_outputs(closure: Iterable[str], drv_path: str) -> list[str]:
    """``closure`` less the outputs ``drv_path`` makes: with ``requisites(...,
    include_outputs=True)`` of the .drv, what building it needs in a store."""
    from circus.common.nix.derivation import read_derivation
    own = set(read_derivation(drv_path).output_paths.values())
    return [p for p in closure if p not in own]


def derivation_outputs(drv_path: str) -> Query[list[str], list[str]]:
    """The output paths of one derivation (``nix-store --query --outputs``)."""
    return Query([["nix-store", "--query", "--outputs", "--", *checked_paths([drv_path])]],
                 _lines, _concat_unique)


# ---------------------------------------------------------------------- path info


@dataclass(frozen=True)
class PathInfo:
    """What the store knows about one valid path, in one notation whatever Nix printed."""

    path: str
    #: ``sha256:<base32>`` (narinfo and fingerprint notation)
    nar_hash: str
    nar_size: int
    #: full store paths, sorted
    references: tuple[str, ...]
    deriver: str | None
    #: the content address in its string form (``fixed:r:sha256:<base32>``, ``text:…``)
    ca: str | None
    #: bytes in the closure; None unless asked for (``closure_size=True``)
    closure_size: int | None = None

    @property
    def nar_hash_sri(self) -> str:
        """``sha256-<base64>``: the notation of the agent protocol (what Nix prints)."""
        return Sha256.parse(self.nar_hash).sri


def path_infos(paths: Iterable[str], *, recursive: bool = False, closure_size: bool = False,
               derivations: bool = False
               ) -> Query[dict[str, PathInfo | None], dict[str, PathInfo]]:
    """Facts about the valid paths of ``paths`` (with ``recursive``, of their closure).

    Invalid paths are left out of the answer. With ``recursive``, Nix refuses an
    invalid path outright (the query fails). Without ``derivations`` give output
    paths, not ``.drv`` files: Nix 2.8 answers for a derivation's outputs instead
    (and builds them when missing); with it, a ``.drv`` is the file itself.
    """
    flags = ["--json"]
    if derivations:
        flags.append("--derivation")
    if recursive:
        flags.append("--recursive")
    if closure_size:
        flags.append("--closure-size")

    def combine(parts: list[dict[str, PathInfo | None]]) -> dict[str, PathInfo]:
        return {path: info for part in parts for path, info in part.items() if info is not None}

    return Query([["nix", "path-info", *flags, "--", *chunk]
                  for chunk in _chunks(_unique(paths))], parse_path_info, combine)


def parse_path_info(text: str) -> dict[str, PathInfo | None]:
    """``nix path-info --json`` output of any Nix version; ``None`` for an invalid path."""
    try:
        data = json.loads(text or "[]")
        if isinstance(data, dict) and isinstance(data.get("info"), dict) and "version" in data:
            data = data["info"]  # --json-format 2 wraps the objects
        if isinstance(data, list):  # Nix < 2.19
            items: Iterable[tuple[Any, Any]] = (
                (entry["path"], None if entry.get("valid", True) is False else entry)
                for entry in data)
        elif isinstance(data, dict):
            items = data.items()
        else:
            raise TypeError(f"a JSON {type(data).__name__}")
        return {_full_path(path): None if entry is None else _path_info(_full_path(path), entry)
                for path, entry in items}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise StoreError(f"unexpected nix path-info output: {exc}") from None


def _path_info(path: str, entry: Mapping[str, Any]) -> PathInfo:
    closure = entry.get("closureSize")
    return PathInfo(
        path=path,
        nar_hash=Sha256.parse(_hash_text(entry["narHash"])).nix,
        nar_size=int(entry["narSize"]),
        references=tuple(sorted(_full_path(r) for r in entry.get("references") or ())),
        deriver=_full_path(entry["deriver"]) if entry.get("deriver") else None,
        ca=_content_address(entry["ca"]) if entry.get("ca") else None,
        closure_size=int(closure) if closure is not None else None,
    )


def _full_path(path: str) -> str:
    """A store path from Nix's JSON: full before format version 2, a base name since."""
    if not isinstance(path, str):
        raise TypeError(f"store path {path!r} is not a string")
    if path.startswith("/"):
        storepath.base_name(path)  # validates
        return path
    return storepath.from_base_name(path)


_HASH_ALGORITHM_SIZES = {"md5": 16, "sha1": 20, "sha256": 32, "sha512": 64}


def _hash_digest(value: str | Mapping[str, Any]) -> tuple[str, bytes]:
    """(algorithm, digest) of a hash as Nix prints it in JSON: a string (SRI
    ``sha256-<base64>`` or ``sha256:<base32|base16|base64>``) or, in format
    version 2, ``{"algorithm": …, "format": …, "hash": …}``."""
    if isinstance(value, Mapping):
        algorithm, encoded, form = value["algorithm"], value["hash"], value.get("format")
    elif "-" in value.partition(":")[0]:
        algorithm, _, encoded = value.partition("-")
        form = "base64"
    else:
        algorithm, _, encoded = value.partition(":")
        form = None
    size = _HASH_ALGORITHM_SIZES.get(algorithm)
    if size is None:
        raise ValueError(f"unknown hash algorithm in {value!r}")
    nix32_length = base32.encoded_length(size)
    if form in ("nix32", "base32") or (form is None and len(encoded) == nix32_length):
        digest = base32.decode(encoded)
    elif form == "base16" or (form is None and len(encoded) == 2 * size):
        digest = bytes.fromhex(encoded)
    else:
        try:
            digest = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"invalid base-64 hash in {value!r}") from None
    if len(digest) != size:
        raise ValueError(f"a {algorithm} hash has {size} bytes, got {len(digest)}")
    return algorithm, digest


def _hash_text(value: str | Mapping[str, Any]) -> str:
    """Any JSON hash → ``<algorithm>:<base32>``."""
    algorithm, digest = _hash_digest(value)
    return f"{algorithm}:{base32.encode(digest)}"


#: format version 2's content-address methods → the prefix of the string form
_CA_PREFIX = {"text": "text:", "flat": "fixed:", "nar": "fixed:r:", "git": "fixed:git:"}


def _content_address(value: str | Mapping[str, Any]) -> str:
    """The content address in the string form narinfo files carry."""
    if isinstance(value, str):
        return value
    prefix = _CA_PREFIX.get(value["method"])
    if prefix is None:
        raise ValueError(f"unknown content-address method {value['method']!r}")
    return prefix + _hash_text(value["hash"])


def dependency_order(infos: Mapping[str, PathInfo]) -> list[str]:
    """The paths of ``infos`` with every path after its references (import order)."""
    ordered: list[str] = []
    seen: set[str] = set()

    def visit(path: str) -> None:
        stack = [(path, iter(infos[path].references))]
        seen.add(path)
        while stack:
            current, refs = stack[-1]
            for ref in refs:
                if ref in infos and ref not in seen and ref != current:
                    seen.add(ref)
                    stack.append((ref, iter(infos[ref].references)))
                    break
            else:
                stack.pop()
                ordered.append(current)

    for path in sorted(infos):
        if path not in seen:
            visit(path)
    return ordered


# ---------------------------------------------------------------------- what to build

_DRY_RUN_PATH = re.compile(r"^\s+(/nix/store/[0-9a-z]{32}-\S+)$")


@dataclass
class Missing:
    """What realising some derivations would do (``nix-store --realise --dry-run``)."""

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
        match = _DRY_RUN_PATH.match(line)
        if match and target is not None:
            target.add(match.group(1))
        elif not line.startswith(" "):
            target = None
    return Missing(to_build, to_fetch)


def _merge_missing(parts: list[Missing]) -> Missing:
    return Missing({d for part in parts for d in part.to_build},
                   {p for part in parts for p in part.to_fetch})


def missing(drv_paths: Iterable[str]) -> Query[Missing, Missing]:
    """Derivations in the closures of ``drv_paths`` that would have to be built.

    Nix stops at valid outputs and asks the configured substituters, so this
    answers "not valid and not substitutable" for a whole batch in one process
    (Nix prints the plan on stderr).
    """
    drvs = sorted(set(checked_paths(drv_paths)))
    return Query([["nix-store", "--realise", "--dry-run", "--", *chunk]
                  for chunk in _chunks(drvs)], parse_dry_run, _merge_missing, reads_stderr=True)
