"""Nix's base-32 encoding (the alphabet without e, o, u, t; least significant bits first)."""

from __future__ import annotations

ALPHABET = "0123456789abcdfghijklmnpqrsvwxyz"
_VALUES = {c: i for i, c in enumerate(ALPHABET)}
CHARS = frozenset(ALPHABET)


def encoded_length(size: int) -> int:
    return (size * 8 - 1) // 5 + 1 if size else 0


def encode(data: bytes) -> str:
    """Encode like Nix's ``printHash32``: the last character holds the first bits."""
    size = len(data)
    out = []
    for n in range(encoded_length(size) - 1, -1, -1):
        bit = n * 5
        i, j = divmod(bit, 8)
        value = data[i] >> j
        if i + 1 < size:
            value |= data[i + 1] << (8 - j)
        out.append(ALPHABET[value & 0x1F])
    return "".join(out)


def decode(text: str) -> bytes:
    """Inverse of :func:`encode`; raises ValueError on bad characters or stray bits."""
    size = len(text) * 5 // 8
    if encoded_length(size) != len(text):
        raise ValueError(f"invalid Nix base-32 length {len(text)}")
    out = bytearray(size)
    for n, char in enumerate(reversed(text)):
        digit = _VALUES.get(char)
        if digit is None:
            raise ValueError(f"invalid Nix base-32 character {char!r}")
        bit = n * 5
        i, j = divmod(bit, 8)
        out[i] |= (digit << j) & 0xFF
        carry = digit >> (8 - j)
        if i + 1 < size:
            out[i + 1] |= carry
        elif carry:
            raise ValueError("invalid Nix base-32 string (non-zero padding bits)")
    return bytes(out)


def is_valid(text: str, size: int) -> bool:
    """True when ``text`` encodes exactly ``size`` bytes (cheap check for URLs)."""
    if len(text) != encoded_length(size) or not CHARS.issuperset(text):
        return False
    try:
        decode(text)
    except ValueError:
        return False
    return True
