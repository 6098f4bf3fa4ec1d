"""NAR files on local disk under ``cache.cache_dir`` (``nar/<filehash>.nar<ext>``).

Packing streams a store path through the NAR writer, hashes the NAR and the
compressed bytes on the way and writes the compressed file under a temporary
name; the final, content-addressed name is known only at the end and is set
by an atomic rename. Nothing is ever held whole in memory.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from circus.common.nix import nar
from circus.common.nix.compression import compressor
from circus.common.nix.hashes import Sha256
from circus.common.nix.narinfo import nar_file_name

#: the only NAR URLs Circus ever writes or serves; anything else is refused unread
NAR_URL = re.compile(r"nar/[0-9a-df-np-sv-z]{52}\.nar(?:\.zst|\.xz)?")


@dataclass(frozen=True)
class PackedNar:
    nar_hash: str
    nar_size: int
    file_hash: str
    file_size: int
    compression: str
    url: str
    file: Path


class LocalFiles:
    def __init__(self, cache_dir: str | Path) -> None:
        self.root = Path(cache_dir)

    def path_of(self, url: str) -> Path | None:
        """The file behind a NAR URL, or None when the URL is not one Circus makes."""
        if NAR_URL.fullmatch(url) is None:
            return None
        return self.root / url

    def pack(self, store_path: str, compression: str, level: int) -> PackedNar:
        (self.root / "nar").mkdir(parents=True, exist_ok=True)
        nar_digest = hashlib.sha256()
        file_digest = hashlib.sha256()
        nar_size = file_size = 0
        squeeze = compressor(compression, level)
        fd, tmp_name = tempfile.mkstemp(prefix=".pack-", dir=self.root / "nar")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in nar.dump(store_path):
                    nar_digest.update(chunk)
                    nar_size += len(chunk)
                    data = squeeze.compress(chunk)
                    if data:
                        file_digest.update(data)
                        file_size += len(data)
                        out.write(data)
                data = squeeze.flush()
                file_digest.update(data)
                file_size += len(data)
                out.write(data)
            file_hash = Sha256(file_digest.digest()).nix
            url = "nar/" + nar_file_name(file_hash, compression)
            final = self.root / url
            os.chmod(tmp, 0o644)
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return PackedNar(Sha256(nar_digest.digest()).nix, nar_size, file_hash, file_size,
                         compression, url, final)

    def remove(self, url: str) -> bool:
        path = self.path_of(url)
        if path is None:
            return False
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        return True
