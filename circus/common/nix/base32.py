"""Nix's base-32 encoding (the alphabet without e, o, u, t; least significant bits first)."""

from __future__ import annotations

ALPHABET = "0123456789abcdfghijklmnpqrsvwxyz"
_VALUES = {c: i for i, c in enumerate(ALPHABET)}
CHARS = frozenset(ALPHABET)


def encoded_length(size: int) -> int:
    return (size * 8 - 1) // 5 + 1 if size else 0


def encode(data: bytes) -> str:
    """Encode like Nix's ``printHash32``: the last character holds the first bits.

    Character ``k`` from the end is bits ``5k .. 5k+4`` of ``data`` read as one
    little-endian integer (one shift per character instead of byte arithmetic: the
    cache publishes a hash or two per path)."""
    number = int.from_bytes(data, "little")
    return "".join(ALPHABET[(number >> shift) & 0x1F]
                   for shift in range(5 * (encoded_length(len(data)) - 1), -1, -5))


def decode(text: str) -> bytes:
    """Inverse of :func:`encode`; raises ValueError on bad characters or stray bits."""
    size = len(text) * 5 // 8
    if encoded_length(size) != len(text):
        raise ValueError(f"invalid Nix base-32 length {len(text)}")
    number = 0
    for char in text:
        digit = _VALUES.get(char)
        if digit is None:
            raise ValueError(f"invalid Nix base-32 character {char!r}")
        number = number << 5 | digit
    if number >> (8 * size):
        raise ValueError("invalid Nix base-32 string (non-zero padding bits)")
    return number.to_bytes(size, "little")


def is_valid(text: str, size: int) -> bool:
    """True when ``text`` encodes exactly ``size`` bytes (cheap check for URLs)."""
    if len(text) != encoded_length(size) or not CHARS.issuperset(text):
        return False
    try:
        decode(text)
    except ValueError:
        return False
    return True
