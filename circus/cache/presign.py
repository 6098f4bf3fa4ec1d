"""Presigned S3 uploads for agents (SPEC §5): mint PUT URLs, then verify and record.

An agent asks for upload URLs for the outputs it built, uploads compressed
NARs straight to S3, and reports completion. Nothing it says is trusted:

- :func:`mint` binds each URL to (agent session, build, store path, NAR hash,
  NAR size, compression) through the object key itself: the key is an HMAC of
  those facts under a secret derived from the cache signing key. No table is
  needed, and an upload reported with any other facts names a different key.
- :func:`verify_and_record` recomputes that key, downloads the object as a
  stream, checks its file hash and size, decompresses it (strictly: truncated
  or trailing data fails), validates the NAR structure while hashing it,
  checks NAR hash and size against the bound values and every claimed
  reference against the NAR's bytes, and only then signs the narinfo, moves
  the object to its content-addressed name and records the row. Any mismatch
  records nothing and deletes the upload.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from circus.cache import records
from circus.cache.publish import signing_key
from circus.cache.s3 import S3Error, S3Store
from circus.common.config import Settings
from circus.common.errors import InvalidInput, NotFound, Unavailable
from circus.common.models import Build, BuildOutput
from circus.common.models import NarInfo as NarInfoRow
from circus.common.nix import nar, storepath
from circus.common.nix.compression import KINDS, DecompressionError, decompressing_reader
from circus.common.nix.hashes import Sha256
from circus.common.nix.narinfo import CONTENT_TYPE as NARINFO_TYPE
from circus.common.nix.narinfo import EXTENSIONS, NarInfo, cache_info, nar_file_name

log = logging.getLogger(__name__)

#: SPEC §5: at most this many presign requests per call
MAX_REQUESTS = 128
UPLOAD_PREFIX = "uploads/"
CHUNK = 256 * 1024


class UploadRejected(InvalidInput):
    """The uploaded object does not match what the URL was minted for; nothing recorded."""


@dataclass(frozen=True)
class UploadRequest:
    store_path: str
    nar_hash: str
    nar_size: int


@dataclass(frozen=True)
class PresignedUpload:
    store_path: str
    #: presigned PUT URL ("" when there is nothing to upload or on error)
    nar_url: str
    #: object key relative to the store prefix; the agent reports it back
    nar_path: str
    compression: str
    error: str | None = None
    #: the path is already in the cache: no upload needed
    already_cached: bool = False


@dataclass(frozen=True)
class UploadReport:
    """What an agent says it uploaded (the narInfo of ``notifyUploadComplete``)."""

    store_path: str
    nar_hash: str
    nar_size: int
    compression: str
    nar_path: str
    file_hash: str | None = None
    file_size: int | None = None
    references: tuple[str, ...] = field(default=())
    deriver: str | None = None
    ca: str | None = None


def _binding_secret(settings: Settings) -> bytes:
    if not settings.signing.key:
        raise Unavailable("presigned uploads need signing.key (it also keys upload bindings)")
    return hashlib.sha256(b"circus presigned upload binding\0" +
                          settings.signing.key.strip().encode()).digest()


def upload_key(settings: Settings, *, session_id: str, build_id: int, store_path: str,
               nar_hash: str, nar_size: int, compression: str) -> str:
    facts = "\0".join([session_id, str(build_id), store_path, nar_hash, str(nar_size),
                       compression])
    token = hmac.new(_binding_secret(settings), facts.encode(), hashlib.sha256).hexdigest()
    return f"{UPLOAD_PREFIX}{token}.nar{EXTENSIONS[compression]}"


def _store(settings: Settings) -> S3Store:
    if not settings.cache_upload.enabled or not settings.cache_upload.store_uri:
        raise Unavailable("presigned uploads need cache_upload.enabled with an s3:// store_uri")
    return S3Store(settings.cache_upload)


def _build_outputs(session: Session, build_id: int) -> tuple[Build, set[str]]:
    build = session.get(Build, build_id)
    if build is None:
        raise NotFound(f"build {build_id} not found")
    outputs = set(session.scalars(select(BuildOutput.path).where(
        BuildOutput.build_id == build_id)))
    return build, outputs


def mint(session: Session, settings: Settings, build_id: int,
         requests: list[UploadRequest], *, session_id: str = "") -> list[PresignedUpload]:
    """Presigned PUT URLs for outputs of ``build_id``; one answer per request, in order."""
    if len(requests) > MAX_REQUESTS:
        raise InvalidInput(f"at most {MAX_REQUESTS} presign requests per call",
                           {"count": len(requests)})
    store = _store(settings)
    _, outputs = _build_outputs(session, build_id)
    compression = settings.cache_upload.compression.value
    expiry = settings.queue_runner.rpc.presign_expiry_secs
    max_size = settings.queue_runner.max_output_size
    cached = set(session.scalars(select(NarInfoRow.store_path).where(
        NarInfoRow.store_path.in_([r.store_path for r in requests]))))
    answers = []
    for request in requests:
        def refuse(reason: str, request: UploadRequest = request) -> PresignedUpload:
            return PresignedUpload(request.store_path, "", "", compression, error=reason)

        if not storepath.is_store_path(request.store_path):
            answers.append(refuse("not a store path"))
            continue
        if request.store_path not in outputs:
            answers.append(refuse(f"not an output of build {build_id}"))
            continue
        try:
            nar_hash = Sha256.parse(request.nar_hash).nix
        except ValueError as exc:
            answers.append(refuse(f"bad NAR hash: {exc}"))
            continue
        if request.nar_size <= 0 or (max_size and request.nar_size > max_size):
            answers.append(refuse(f"bad NAR size {request.nar_size}"))
            continue
        if request.store_path in cached:
            answers.append(PresignedUpload(request.store_path, "", "", compression,
                                           already_cached=True))
            continue
        key = upload_key(settings, session_id=session_id, build_id=build_id,
                         store_path=request.store_path, nar_hash=nar_hash,
                         nar_size=request.nar_size, compression=compression)
        try:
            url = store.presigned_put(key, expiry)
        except S3Error as exc:
            answers.append(refuse(f"cannot presign: {exc}"))
            continue
        answers.append(PresignedUpload(request.store_path, url, key, compression))
    return answers


class _Counting:
    """Hashes and counts the compressed bytes as they stream in; bounded."""

    def __init__(self, body: Any, limit: int) -> None:
        self.body = body
        self.limit = limit
        self.digest = hashlib.sha256()
        self.size = 0

    def read(self, size: int = -1, /) -> bytes:
        data: bytes = self.body.read(CHUNK if size < 0 else size)
        self.size += len(data)
        if self.size > self.limit:
            raise UploadRejected("uploaded file is far larger than its NAR")
        self.digest.update(data)
        return data


class _ReferenceScanner:
    """Finds which of the claimed references' hash parts occur in the NAR bytes."""

    def __init__(self, references: tuple[str, ...]) -> None:
        self.wanted = {storepath.hash_part(r).encode(): r for r in references}
        self.found: set[bytes] = set()
        self.tail = b""

    def feed(self, data: bytes) -> None:
        if len(self.found) == len(self.wanted):
            return
        window = self.tail + data
        for needle in self.wanted.keys() - self.found:
            if needle in window:
                self.found.add(needle)
        self.tail = window[-(storepath.HASH_PART_LENGTH - 1):]

    def missing(self) -> list[str]:
        return sorted(r for h, r in self.wanted.items() if h not in self.found)


def verify_and_record(session: Session, settings: Settings, build_id: int,
                      report: UploadReport, *, session_id: str = "") -> NarInfo:
    """Check an uploaded NAR against its binding and record it; raises :class:`UploadRejected`.

    The report must be well-formed (:func:`_parse_report`), name an output of the
    build and carry the key minted for exactly these facts; only then is the object
    read and checked (:func:`_verify_upload`), copied to its content address with
    a signed narinfo (:func:`_publish_verified`) and recorded. The caller commits
    the session.
    """
    store = _store(settings)
    build, outputs = _build_outputs(session, build_id)
    facts = _parse_report(report)
    if report.store_path not in outputs:
        raise UploadRejected(f"{report.store_path} is not an output of build {build_id}")
    expected = upload_key(settings, session_id=session_id, build_id=build_id,
                          store_path=report.store_path, nar_hash=facts.nar_hash,
                          nar_size=report.nar_size, compression=report.compression)
    if not hmac.compare_digest(expected, report.nar_path):
        # the facts differ from the minted ones: never even look at the object
        raise UploadRejected("the upload was not minted for these facts")
    try:
        file_hash, file_size = _verify_upload(store, expected, report, facts)
    except UploadRejected as exc:
        log.warning("cache: rejected upload of %s for build %s: %s", report.store_path,
                    build_id, exc.message)
        _discard(store, expected)
        raise
    narinfo = NarInfo(store_path=report.store_path,
                      url="nar/" + nar_file_name(file_hash, report.compression),
                      compression=report.compression, nar_hash=facts.nar_hash,
                      nar_size=report.nar_size, references=facts.references,
                      file_hash=file_hash, file_size=file_size, deriver=report.deriver,
                      ca=report.ca)
    key = signing_key(settings)
    if key is not None:
        narinfo = narinfo.signed(key)
    _publish_verified(store, settings, expected, narinfo)
    records.lock_shared(session)
    records.insert_rows(session, [records.to_values(
        narinfo, storage="s3", build_id=build_id, project_id=build.project_id)])
    records.link_projects(session, [narinfo.store_path], build.project_id)
    session.flush()
    return narinfo


@dataclass(frozen=True)
class _ReportFacts:
    """The checked, normalised facts of an upload report."""

    #: in Nix's base-32 form
    nar_hash: str
    #: sorted, without duplicates
    references: tuple[str, ...]
    claimed_file_hash: str | None


def _parse_report(report: UploadReport) -> _ReportFacts:
    """Check the report's form (hashes, compression, store paths); raises
    :class:`UploadRejected`."""
    try:
        nar_hash = Sha256.parse(report.nar_hash).nix
        if report.compression not in KINDS:
            raise ValueError(f"unknown compression {report.compression!r}")
        if not storepath.is_store_path(report.store_path):
            raise ValueError("not a store path")
        references = tuple(sorted(set(report.references)))
        for reference in references:
            storepath.base_name(reference)
        if report.deriver is not None:
            storepath.base_name(report.deriver)
        claimed_file_hash = Sha256.parse(report.file_hash).nix if report.file_hash else None
    except ValueError as exc:
        raise UploadRejected(f"malformed upload report: {exc}") from None
    return _ReportFacts(nar_hash, references, claimed_file_hash)


def _verify_upload(store: S3Store, key: str, report: UploadReport, facts: _ReportFacts
                   ) -> tuple[str, int]:
    """Read the uploaded object and compare it with the report: NAR hash and size,
    file hash and size, and every claimed reference occurring in the NAR. Returns
    the file's hash and size; raises :class:`UploadRejected` naming every mismatch."""
    counting, digest, scanner = _download_and_check(store, key, report, facts.references)
    file_hash = Sha256(counting.digest.digest()).nix
    problems = []
    if (digest.nar_hash.nix, digest.nar_size) != (facts.nar_hash, report.nar_size):
        problems.append(f"NAR is {digest.nar_hash.nix} ({digest.nar_size} bytes), expected"
                        f" {facts.nar_hash} ({report.nar_size} bytes)")
    if facts.claimed_file_hash is not None and facts.claimed_file_hash != file_hash:
        problems.append(f"file hash is {file_hash}, reported {facts.claimed_file_hash}")
    if report.file_size is not None and report.file_size != counting.size:
        problems.append(f"file size is {counting.size}, reported {report.file_size}")
    missing = scanner.missing()
    if missing:
        problems.append(f"claimed references do not occur in the NAR: {missing}")
    if problems:
        raise UploadRejected("upload does not match: " + "; ".join(problems))
    return file_hash, counting.size


def _publish_verified(store: S3Store, settings: Settings, key: str, narinfo: NarInfo) -> None:
    """Copy the verified object to its content address, write its narinfo (and
    ``nix-cache-info`` once), then drop the upload; raises :class:`Unavailable`."""
    try:
        if not store.exists(narinfo.url):
            store.copy(key, narinfo.url)
        store.put_bytes(f"{narinfo.hash_part}.narinfo", narinfo.render().encode(),
                        NARINFO_TYPE)
        if not store.exists("nix-cache-info"):
            store.put_bytes("nix-cache-info", cache_info(settings.cache.priority).encode(),
                            "text/x-nix-cache-info")
    except S3Error as exc:
        raise Unavailable(f"cannot store the verified NAR in S3: {exc}") from None
    _discard(store, key)


def _download_and_check(store: S3Store, key: str, report: UploadReport,
                        references: tuple[str, ...]
                        ) -> tuple[_Counting, nar.NarDigest, _ReferenceScanner]:
    try:
        body = store.open(key)
    except S3Error as exc:
        raise UploadRejected(f"no uploaded object to verify: {exc}") from None
    # compressed data is never much larger than its input; anything bigger is not a NAR
    counting = _Counting(body, report.nar_size + report.nar_size // 64 + 64 * 1024)
    scanner = _ReferenceScanner(references)
    try:
        stream = decompressing_reader(report.compression, counting, CHUNK)
        digest = nar.read(stream, limit=report.nar_size, observe=scanner.feed, chunk_size=CHUNK)
        while counting.read(CHUNK):
            pass
    except (nar.NarFormatError, DecompressionError) as exc:
        raise UploadRejected(f"not a {report.compression} NAR: {exc}") from None
    except S3Error as exc:
        raise UploadRejected(f"download of the upload failed: {exc}") from None
    finally:
        body.close()
    return counting, digest, scanner


def _discard(store: S3Store, key: str) -> None:
    try:
        store.delete([key])
    except S3Error as exc:
        log.warning("cache: cannot delete upload %s: %s", key, exc)
