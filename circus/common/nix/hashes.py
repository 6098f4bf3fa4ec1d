"""SHA-256 hashes in the notations Nix prints and accepts."""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass

from circus.common.nix import base32

SHA256_SIZE = 32


@dataclass(frozen=True)
class Sha256:
    digest: bytes

    @classmethod
    def parse(cls, text: str) -> Sha256:
        """Accept ``sha256:<base32|base16|base64>`` and SRI ``sha256-<base64>``."""
        if text.startswith("sha256-"):
            return cls(_from_base64(text[7:]))
        algo, sep, value = text.partition(":")
        if not sep or algo != "sha256":
            raise ValueError(f"not a sha256 hash: {text!r}")
        if len(value) == base32.encoded_length(SHA256_SIZE):
            return cls(base32.decode(value))
        if len(value) == 2 * SHA256_SIZE:
            try:
                return cls(bytes.fromhex(value))
            except ValueError:
                raise ValueError(f"invalid base-16 hash: {text!r}") from None
        return cls(_from_base64(value))

    @classmethod
    def of(cls, data: bytes) -> Sha256:
        return cls(hashlib.sha256(data).digest())

    @property
    def base32(self) -> str:
        return base32.encode(self.digest)

    @property
    def nix(self) -> str:
        """The ``sha256:<base32>`` form used in narinfo files and fingerprints."""
        return f"sha256:{self.base32}"

    @property
    def sri(self) -> str:
        return "sha256-" + base64.b64encode(self.digest).decode()

    def __str__(self) -> str:
        return self.nix


def _from_base64(value: str) -> bytes:
    try:
        digest = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"invalid base-64 hash: {value!r}") from None
    if len(digest) != SHA256_SIZE:
        raise ValueError(f"a sha256 hash has 32 bytes, got {len(digest)}")
    return digest


def normalise(text: str) -> str:
    """Any accepted notation → ``sha256:<base32>``."""
    return Sha256.parse(text).nix
