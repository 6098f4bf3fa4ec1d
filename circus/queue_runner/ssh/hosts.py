"""Where an SSH builder is (``ssh_uri``) and how it proves it (``public_host_key``)."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from paramiko import PKey
from paramiko.pkey import UnknownKeyType
from paramiko.ssh_exception import SSHException

#: prefixes of the key types OpenSSH writes into known_hosts and ``*.pub`` files
_KEY_TYPE_PREFIXES = ("ssh-", "ecdsa-sha2-", "sk-ssh-", "sk-ecdsa-")


class HostKeyFormatError(ValueError):
    pass


@dataclass(frozen=True)
class SshTarget:
    host: str
    port: int
    user: str | None

    def known_hosts_names(self) -> list[str]:
        """The names OpenSSH and paramiko look a host key up under."""
        bracketed = f"[{self.host}]:{self.port}"
        return [self.host, bracketed] if self.port == 22 else [bracketed, self.host]

    def __str__(self) -> str:
        user = f"{self.user}@" if self.user else ""
        return f"{user}{self.host}:{self.port}"


def parse_ssh_uri(uri: str) -> SshTarget:
    """``user@host``, ``host``, ``ssh://user@host[:port]`` or ``ssh-ng://user@host[:port]``.

    ``ssh-ng://`` names the same machine; Circus talks to it the same way.
    """
    text = uri.strip()
    if "://" not in text:
        text = "ssh://" + text
    try:
        parts = urlsplit(text)
        port = parts.port or 22
    except ValueError as exc:
        raise ValueError(f"invalid ssh_uri {uri!r}: {exc}") from None
    if parts.scheme not in ("ssh", "ssh-ng") or not parts.hostname:
        raise ValueError(f"invalid ssh_uri {uri!r}: expected user@host or ssh://user@host[:port]")
    if parts.path not in ("", "/") or parts.query:
        raise ValueError(f"invalid ssh_uri {uri!r}: no path or options allowed")
    user = unquote(parts.username) if parts.username else None
    return SshTarget(parts.hostname, port, user)


def _is_key_type(token: str) -> bool:
    return token.startswith(_KEY_TYPE_PREFIXES)


def parse_host_keys(text: str) -> list[PKey]:
    """The public keys in ``public_host_key``.

    Accepted per line: a known_hosts line (``host[,host] type base64``; the
    host part is ignored — the key is bound to the builder's own address), a
    bare public key line (``type base64 [comment]``, as in ``*.pub``), or
    Hydra's machines-file form (the base64 encoding of such a line).
    ``@revoked`` lines are skipped; ``@cert-authority`` is not supported.
    """
    keys: list[PKey] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        tokens = line.split()
        if tokens[0] == "@revoked":
            continue
        if tokens[0].startswith("@"):
            raise HostKeyFormatError(f"line {number}: {tokens[0]} is not supported")
        if len(tokens) == 1 and not _is_key_type(tokens[0]):
            tokens = _hydra_form(tokens[0], number)
        index = next((i for i, t in enumerate(tokens) if _is_key_type(t)), None)
        if index is None or index + 1 >= len(tokens):
            raise HostKeyFormatError(
                f"line {number}: no key (expected e.g. 'ssh-ed25519 AAAA...')")
        key_type, blob = tokens[index], tokens[index + 1]
        try:
            keys.append(PKey.from_type_string(key_type, base64.b64decode(blob, validate=True)))
        except (binascii.Error, SSHException, UnknownKeyType, ValueError) as exc:
            raise HostKeyFormatError(f"line {number}: invalid {key_type} key: {exc}") from None
    if not keys:
        raise HostKeyFormatError("no key found")
    return keys


def _hydra_form(token: str, number: int) -> list[str]:
    try:
        decoded = base64.b64decode(token, validate=True).decode()
    except (ValueError, UnicodeDecodeError):   # binascii.Error; a non-ASCII token
        raise HostKeyFormatError(
            f"line {number}: expected 'type base64-key' or a known_hosts line") from None
    return decoded.split()
