"""ed25519 keys and signatures in Nix's ``name:base64`` format."""

from __future__ import annotations

import base64
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat


class KeyFormatError(ValueError):
    pass


def _split(text: str) -> tuple[str, bytes]:
    name, sep, data = text.strip().partition(":")
    if not sep or not name:
        raise KeyFormatError("key must look like name:base64")
    try:
        return name, base64.b64decode(data, validate=True)
    except ValueError:
        raise KeyFormatError("key data is not valid base64") from None


@dataclass(frozen=True)
class SecretKey:
    name: str
    key: Ed25519PrivateKey

    @classmethod
    def parse(cls, text: str) -> SecretKey:
        name, data = _split(text)
        # Nix stores the 32-byte seed followed by the 32-byte public key
        if len(data) != 64:
            raise KeyFormatError(f"secret key must be 64 bytes, got {len(data)}")
        return cls(name, Ed25519PrivateKey.from_private_bytes(data[:32]))

    def public_key(self) -> PublicKey:
        return PublicKey(self.name, self.key.public_key())

    def sign(self, message: str) -> str:
        signature = self.key.sign(message.encode())
        return f"{self.name}:{base64.b64encode(signature).decode()}"


@dataclass(frozen=True)
class PublicKey:
    name: str
    key: Ed25519PublicKey

    @classmethod
    def parse(cls, text: str) -> PublicKey:
        name, data = _split(text)
        if len(data) != 32:
            raise KeyFormatError(f"public key must be 32 bytes, got {len(data)}")
        return cls(name, Ed25519PublicKey.from_public_bytes(data))

    def __str__(self) -> str:
        raw = self.key.public_bytes(Encoding.Raw, PublicFormat.Raw)
        return f"{self.name}:{base64.b64encode(raw).decode()}"

    def verify(self, message: str, signature: str) -> bool:
        name, sep, data = signature.partition(":")
        if not sep or name != self.name:
            return False
        try:
            self.key.verify(base64.b64decode(data), message.encode())
        except (InvalidSignature, ValueError):
            return False
        return True


def generate_key_pair(name: str) -> tuple[str, str]:
    """(secret, public) in the format of ``nix-store --generate-binary-cache-key``."""
    private = Ed25519PrivateKey.generate()
    from cryptography.hazmat.primitives.serialization import NoEncryption, PrivateFormat

    seed = private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    public = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    secret_text = f"{name}:{base64.b64encode(seed + public).decode()}"
    public_text = f"{name}:{base64.b64encode(public).decode()}"
    return secret_text, public_text


def fingerprint(store_path: str, nar_hash: str, nar_size: int, references: list[str]) -> str:
    """What Nix signs: ``1;<path>;<narHash>;<narSize>;<refs,comma-separated>``."""
    return f"1;{store_path};{nar_hash};{nar_size};{','.join(sorted(references))}"
