"""Store path syntax: ``/nix/store/<32 base-32 chars>-<name>``."""

from __future__ import annotations

import re

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
