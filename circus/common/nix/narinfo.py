"""``.narinfo`` files: rendering, parsing, fingerprints and signatures."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from circus.common.nix import storepath
from circus.common.nix.hashes import Sha256
from circus.common.nix.signing import PublicKey, SecretKey, fingerprint

#: file extension of a compressed NAR per narinfo ``Compression`` value
EXTENSIONS = {"zstd": ".zst", "xz": ".xz", "none": ""}
CONTENT_TYPE = "text/x-nix-narinfo"


class NarInfoError(ValueError):
    pass


@dataclass(frozen=True)
class NarInfo:
    store_path: str
    url: str
    compression: str
    nar_hash: str  # sha256:<base32>
    nar_size: int
    #: full store paths
    references: tuple[str, ...] = ()
    file_hash: str | None = None
    file_size: int | None = None
    deriver: str | None = None
    sigs: tuple[str, ...] = field(default=())
    ca: str | None = None

    @property
    def hash_part(self) -> str:
        return storepath.hash_part(self.store_path)

    def fingerprint(self) -> str:
        return fingerprint(self.store_path, self.nar_hash, self.nar_size, list(self.references))

    def signed(self, key: SecretKey) -> NarInfo:
        """A copy carrying ``key``'s signature (replacing an older one by the same key name)."""
        signature = key.sign(self.fingerprint())
        kept = tuple(s for s in self.sigs if not s.startswith(key.name + ":"))
        return replace(self, sigs=(*kept, signature))

    def verify(self, keys: Iterable[PublicKey]) -> bool:
        message = self.fingerprint()
        return any(key.verify(message, sig) for key in keys for sig in self.sigs)

    def render(self) -> str:
        lines = [f"StorePath: {self.store_path}", f"URL: {self.url}",
                 f"Compression: {self.compression}"]
        if self.file_hash is not None:
            lines.append(f"FileHash: {self.file_hash}")
        if self.file_size is not None:
            lines.append(f"FileSize: {self.file_size}")
        lines += [f"NarHash: {self.nar_hash}", f"NarSize: {self.nar_size}",
                  "References: " + " ".join(sorted(storepath.base_name(r)
                                                   for r in self.references))]
        if self.deriver:
            lines.append(f"Deriver: {storepath.base_name(self.deriver)}")
        lines += [f"Sig: {sig}" for sig in self.sigs]
        if self.ca:
            lines.append(f"CA: {self.ca}")
        return "\n".join(lines) + "\n"

    @classmethod
    def parse(cls, text: str) -> NarInfo:
        fields: dict[str, str] = {}
        sigs: list[str] = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            key, sep, value = line.partition(": ")
            if not sep:
                key, sep, value = line.partition(":")
                if not sep:
                    raise NarInfoError(f"line {number}: expected 'Key: value'")
            if key == "Sig":
                sigs.append(value.strip())
            else:
                fields[key] = value.strip()
        try:
            store_path = fields["StorePath"]
            storepath.base_name(store_path)
            refs = tuple(storepath.from_base_name(r) for r in fields.get("References", "").split())
            deriver = fields.get("Deriver")
            if deriver == "unknown-deriver":
                deriver = None
            return cls(
                store_path=store_path,
                url=fields["URL"],
                # Nix defaults to bzip2 when the field is missing
                compression=fields.get("Compression", "bzip2"),
                nar_hash=Sha256.parse(fields["NarHash"]).nix,
                nar_size=_size(fields["NarSize"]),
                references=refs,
                file_hash=Sha256.parse(fields["FileHash"]).nix if "FileHash" in fields
                else None,
                file_size=_size(fields["FileSize"]) if "FileSize" in fields else None,
                deriver=storepath.from_base_name(deriver) if deriver else None,
                sigs=tuple(sigs),
                ca=fields.get("CA") or None,
            )
        except KeyError as exc:
            raise NarInfoError(f"missing field {exc.args[0]}") from None
        except storepath.StorePathError as exc:
            raise NarInfoError(str(exc)) from None
        except ValueError as exc:
            if isinstance(exc, NarInfoError):
                raise
            raise NarInfoError(str(exc)) from None


def _size(text: str) -> int:
    if not text.isdigit():
        raise NarInfoError(f"not a size: {text!r}")
    return int(text)


def nar_file_name(file_hash: str, compression: str) -> str:
    """``<base32 file hash>.nar<ext>``, the content-addressed name of a NAR file."""
    return f"{Sha256.parse(file_hash).base32}.nar{EXTENSIONS[compression]}"


def cache_info(priority: int, want_mass_query: bool = True) -> str:
    return (f"StoreDir: {storepath.STORE_DIR}\nWantMassQuery: {int(want_mass_query)}\n"
            f"Priority: {priority}\n")
