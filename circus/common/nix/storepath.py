"""Store path syntax (``/nix/store/<32 base-32 chars>-<name>``) and the content-addressed
paths Nix computes from a file's contents (text files such as ``.drv``, sources)."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

from circus.common.nix import base32

STORE_DIR = "/nix/store"
HASH_PART_LENGTH = 32
_NAME = re.compile(r"[A-Za-z0-9+\-._?=]+")
_HASH_PART = re.compile(r"[0123456789abcdfghijklmnpqrsvwxyz]{32}")
MAX_NAME_LENGTH = 211


class StorePathError(ValueError):
    pass


def is_hash_part(text: str) -> bool:
    return _HASH_PART.fullmatch(text) is not None


def base_name(path: str) -> str:
    """Validate ``path`` and return ``<hash>-<name>``."""
    prefix = STORE_DIR + "/"
    if not path.startswith(prefix):
        raise StorePathError(f"not in {STORE_DIR}: {path!r}")
    base = path[len(prefix):]
    validate_base_name(base)
    return base


def validate_base_name(base: str) -> None:
    hash_part, dash, name = base[:HASH_PART_LENGTH], base[HASH_PART_LENGTH:][:1], \
        base[HASH_PART_LENGTH + 1:]
    if not is_hash_part(hash_part) or dash != "-":
        raise StorePathError(f"invalid store path hash part in {base!r}")
    if not name or len(name) > MAX_NAME_LENGTH or name.startswith(".") or \
            _NAME.fullmatch(name) is None:
        raise StorePathError(f"invalid store path name in {base!r}")


def hash_part(path: str) -> str:
    return base_name(path)[:HASH_PART_LENGTH]


def is_store_path(path: str) -> bool:
    try:
        base_name(path)
    except StorePathError:
        return False
    return True


def from_base_name(base: str) -> str:
    validate_base_name(base)
    return f"{STORE_DIR}/{base}"


# ---------------------------------------------------------------------------
# content-addressed store paths, computed as Nix's ``Store::makeStorePath`` does

#: bytes of the hash part (32 base-32 characters)
HASH_PART_SIZE = 20


def name_of(path: str) -> str:
    """The name of a store path: what follows ``<hash>-``."""
    return base_name(path)[HASH_PART_LENGTH + 1:]


def compress_hash(digest: bytes, size: int = HASH_PART_SIZE) -> bytes:
    """Nix's ``compressHash``: the digest folded onto ``size`` bytes by XOR."""
    folded = bytearray(size)
    for index, byte in enumerate(digest):
        folded[index % size] ^= byte
    return bytes(folded)


def make_store_path(kind: str, sha256_digest: bytes, name: str) -> str:
    """The store path of ``<kind>:sha256:<hex digest>:/nix/store:<name>`` (``kind`` is
    Nix's "type": ``text:<refs>``, ``source:<refs>``, ``output:out``)."""
    fingerprint = f"{kind}:sha256:{sha256_digest.hex()}:{STORE_DIR}:{name}"
    digest = hashlib.sha256(fingerprint.encode()).digest()
    return from_base_name(f"{base32.encode(compress_hash(digest))}-{name}")


def _kind(kind: str, references: Iterable[str]) -> str:
    # Nix's makeType: the references, sorted (a std::set), each after a colon
    return "".join([kind, *(f":{ref}" for ref in sorted(set(references)))])


def make_text_path(name: str, contents_sha256: bytes, references: Iterable[str]) -> str:
    """Where Nix puts a text file (a ``.drv``, ``builtins.toFile``) of these contents
    and references: ``makeTextPath``."""
    return make_store_path(_kind("text", references), contents_sha256, name)


def make_source_path(name: str, nar_sha256: bytes, references: Iterable[str] = ()) -> str:
    """Where Nix puts a tree added by NAR SHA-256 (``./file`` in an expression,
    ``builtins.path``, ``nix-store --add``): ``makeFixedOutputPath`` recursive."""
    return make_store_path(_kind("source", references), nar_sha256, name)


def make_flat_path(name: str, file_sha256: bytes) -> str:
    """Where Nix puts a single file added by its flat SHA-256 (``builtins.path`` with
    ``recursive = false``): ``makeFixedOutputPath`` flat, no references."""
    inner = hashlib.sha256(f"fixed:out:sha256:{file_sha256.hex()}:".encode()).digest()
    return make_store_path("output:out", inner, name)
