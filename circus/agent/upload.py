"""Presigned S3 uploads from the agent (SPEC §5).

When the runner's cache lives in S3, the agent packs each output as a
compressed NAR itself, asks the runner for presigned PUT URLs, uploads, and
reports each upload; the runner downloads and verifies every byte before it
signs and records the narinfo, so nothing the agent says is trusted.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import tempfile
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from circus.common.nix import nar
from circus.common.nix.compression import compressor
from circus.common.nix.hashes import Sha256
from circus.common.nix.store import PathInfo

log = logging.getLogger(__name__)


class UploadFailed(Exception):
    pass


@dataclass(frozen=True)
class PackedNar:
    store_path: str
    file: Path
    file_hash: str
    file_size: int


def pack(store_path: str, kind: str, level: int, directory: Path) -> PackedNar:
    """Serialise and compress ``store_path`` into a file, hashing what is written."""
    target = directory / (Path(store_path).name + ".nar")
    digest = hashlib.sha256()
    size = 0
    packer = compressor(kind, level)
    with target.open("wb") as handle:
        for chunk in nar.dump(store_path):
            data = packer.compress(chunk)
            digest.update(data)
            size += len(data)
            handle.write(data)
        tail = packer.flush()
        digest.update(tail)
        size += len(tail)
        handle.write(tail)
    return PackedNar(store_path, target, Sha256(digest.digest()).nix, size)


def put(url: str, packed: PackedNar, timeout: float = 600) -> None:
    with packed.file.open("rb") as body:
        request = urllib.request.Request(  # noqa: S310 - the URL comes from our runner
            url, data=body, method="PUT",
            headers={"Content-Length": str(packed.file_size)})
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            if response.status not in (200, 201, 204):
                raise UploadFailed(f"upload answered HTTP {response.status}")


async def upload_outputs(runner: Any, machine_id: str, build_id: int, step_id: int,
                         infos: Mapping[str, PathInfo], outputs: list[str],
                         compression: str, level: int) -> list[str]:
    """Upload ``outputs``; returns the paths the runner recorded. Raises UploadFailed."""
    requests = [{"storePath": p, "narHash": infos[p].nar_hash_sri, "narSize": infos[p].nar_size}
                for p in outputs]
    answer = await runner.requestPresignedUrls(machine_id, build_id, requests, step_id)
    recorded = []
    with tempfile.TemporaryDirectory(prefix="circus-upload-") as scratch:
        for url in answer.urls:
            if url.error:
                raise UploadFailed(f"{url.storePath}: {url.error}")
            if not url.narUrl:
                continue  # already in the cache
            packed = await asyncio.to_thread(pack, url.storePath, url.compression or compression,
                                             level, Path(scratch))
            try:
                await asyncio.to_thread(put, url.narUrl, packed)
            except OSError as exc:
                raise UploadFailed(f"{url.storePath}: upload failed: {exc}") from None
            info = infos[url.storePath]
            done = await runner.notifyUploadComplete(machine_id, build_id, {
                "storePath": url.storePath, "narHash": info.nar_hash_sri, "narSize": info.nar_size,
                "fileHash": packed.file_hash, "fileSize": packed.file_size,
                "compression": url.compression or compression, "narPath": url.narPath,
                "references": list(info.references), "deriver": info.deriver or "", "ca": ""},
                step_id)
            if not done.ok:
                raise UploadFailed(f"{url.storePath}: the runner rejected the upload: "
                                   f"{done.error}")
            recorded.append(url.storePath)
            log.info("uploaded %s (%d bytes, %s)", url.storePath, packed.file_size,
                     url.compression or compression)
    return recorded
