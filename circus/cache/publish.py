"""Publishing a finished build's outputs into the binary cache.

The queue runner calls :func:`publish_outputs` in the worker, after the outputs
are valid and before the build is marked finished, so
``cache_upload.fail_build_on_upload_error`` can fail the build. The caller
commits the session.

For every path of the outputs' closure that is not yet recorded: stream its NAR
(Python writer, checked against the hash in Nix's database), compress it into
``cache.cache_dir``, sign the fingerprint, upload NAR and narinfo to S3 when
configured, then record everything in one multi-row insert. Paths already
recorded are only signed (if they lack our signature) and linked to the
build's project. Running it twice changes nothing the second time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from circus.cache import pathinfo, records
from circus.cache.files import LocalFiles, PackedNar
from circus.cache.s3 import S3Error, S3Store
from circus.common.config import Settings
from circus.common.errors import NotFound
from circus.common.models import Build, BuildOutput, Project
from circus.common.models import NarInfo as NarInfoRow
from circus.common.nix.nar import NarFormatError
from circus.common.nix.narinfo import CONTENT_TYPE as NARINFO_TYPE
from circus.common.nix.narinfo import NarInfo, cache_info
from circus.common.nix.signing import SecretKey

log = logging.getLogger(__name__)

NAR_TYPE = "application/x-nix-nar"


class UploadError(Exception):
    """Uploading to the configured remote store failed after all retries."""


@dataclass
class PublishResult:
    #: store paths recorded in narinfo_cache (outputs and, as needed, their closure)
    published: list[str] = field(default_factory=list)
    signed: bool = False
    #: paths packed (and uploaded) by this call; the rest were recorded before
    added: list[str] = field(default_factory=list)
    #: paths that could not be packed, with the reason (they are not recorded)
    errors: dict[str, str] = field(default_factory=dict)


def signing_key(settings: Settings) -> SecretKey | None:
    if not settings.signing.enabled or not settings.signing.key:
        return None
    return SecretKey.parse(settings.signing.key)


def publish_outputs(session: Session, settings: Settings, build_id: int) -> PublishResult:
    """Record (compress, sign, upload) the outputs of a succeeded build.

    Idempotent. Raises :class:`UploadError` only when an S3 upload failed and
    ``cache_upload.fail_build_on_upload_error`` is set; nothing new is recorded
    then. Otherwise a failed upload leaves the path served from local disk, and
    the next publish touching it tries the upload again.
    """
    build = session.get(Build, build_id)
    if build is None:
        raise NotFound(f"build {build_id} not found")
    result = PublishResult()
    if not (settings.cache.enabled or settings.cache_upload.enabled):
        return result
    project = session.get(Project, build.project_id)
    if project is None or not project.cache_enabled:
        return result
    outputs = list(session.scalars(
        select(BuildOutput.path).where(BuildOutput.build_id == build_id)))
    if not outputs:
        return result
    env = settings.nix_environ()
    try:
        infos = _closure(outputs, env, result)
    except pathinfo.PathInfoError as exc:
        # the build's result stands; its outputs are just not in the cache
        log.error("cache: cannot publish build %s: %s", build_id, exc)
        result.errors.update({p: str(exc) for p in outputs if p not in result.errors})
        return result

    records.lock_shared(session)
    key = signing_key(settings)
    closure_paths = [info.path for info in infos]
    existing = {row.store_path: row for row in session.execute(
        select(NarInfoRow).where(NarInfoRow.store_path.in_(closure_paths))).scalars()}

    uploader = _Uploader(settings) if settings.cache_upload.enabled else None
    files = LocalFiles(settings.cache.cache_dir)
    compression = (settings.cache_upload.compression if uploader
                   else settings.cache.compression).value
    missing = [info for info in infos if info.path not in existing]

    def process_one(info: pathinfo.PathInfo) -> tuple[NarInfo, str] | str:
        try:
            packed = files.pack(info.path, compression, settings.cache.compression_level)
        except (OSError, NarFormatError) as exc:
            return f"cannot archive {info.path}: {exc}"
        if packed.nar_hash != info.nar_hash or packed.nar_size != info.nar_size:
            # never serve bytes that disagree with what Nix recorded for the path
            return (f"NAR of {info.path} hashes to {packed.nar_hash} ({packed.nar_size} bytes)"
                    f" but Nix's database says {info.nar_hash} ({info.nar_size} bytes)")
        narinfo = _narinfo(info, packed)
        if key is not None:
            narinfo = narinfo.signed(key)
        storage = "local"
        if uploader is not None:
            storage = uploader.upload(narinfo, packed.file)
        return narinfo, storage

    outcomes = _run_parallel(process_one, missing, _workers(settings, len(missing)))

    values: list[dict[str, Any]] = []
    uploaded: list[NarInfo] = []
    for info, outcome in zip(missing, outcomes, strict=True):
        if isinstance(outcome, str):
            log.error("cache: not publishing %s: %s", info.path, outcome)
            result.errors[info.path] = outcome
            continue
        narinfo, storage = outcome
        values.append(records.to_values(narinfo, storage=storage, build_id=build_id,
                                        project_id=build.project_id))
        result.added.append(info.path)
        if storage == "s3":
            uploaded.append(narinfo)

    if uploader is not None:
        retried = _retry_uploads(session, uploader, files, existing.values(), key)
        failures = uploader.failures
        if failures:
            if settings.cache_upload.fail_build_on_upload_error:
                raise UploadError("; ".join(f"{p}: {e}" for p, e in failures.items()))
            for path, error in failures.items():
                log.warning("cache: upload of %s failed, serving it from local disk: %s",
                            path, error)
        uploaded += retried
        if uploaded:
            uploader.ensure_cache_info(settings.cache.priority)

    records.insert_rows(session, values)
    if key is not None:
        _sign_existing(session, key, existing.values())
    added = set(result.added)
    recorded = [p for p in closure_paths if p in existing or p in added]
    records.link_projects(session, recorded, build.project_id)
    if uploader is not None:
        # the local copy of an uploaded NAR is dropped unless a local row still uses it
        _drop_uploaded_local_files(session, files, uploaded)
    result.published = recorded
    if key is not None and all(o in recorded for o in outputs):
        session.execute(update(Build).where(Build.id == build_id).values(signed=True))
        result.signed = True
    session.flush()
    return result


def _closure(outputs: list[str], env: dict[str, str], result: PublishResult
             ) -> list[pathinfo.PathInfo]:
    try:
        return pathinfo.closure(outputs, env)
    except pathinfo.PathInfoError:
        # some output is not valid (never built, or collected): publish the others
        invalid = set(pathinfo.invalid_paths(outputs, env))
        if not invalid:
            raise
        for path in invalid:
            result.errors[path] = "not a valid store path (not built or garbage-collected)"
        return pathinfo.closure([p for p in outputs if p not in invalid], env)


def _narinfo(info: pathinfo.PathInfo, packed: PackedNar) -> NarInfo:
    return NarInfo(
        store_path=info.path, url=packed.url, compression=packed.compression,
        nar_hash=info.nar_hash, nar_size=info.nar_size, references=info.references,
        file_hash=packed.file_hash, file_size=packed.file_size, deriver=info.deriver,
        ca=info.ca)


def _workers(settings: Settings, jobs: int) -> int:
    # compression and hashing release the GIL; uploads wait on the network
    wanted = settings.cache_upload.upload_concurrency if settings.cache_upload.enabled else 2
    return max(1, min(wanted, jobs))


def _run_parallel(func: Callable[[Any], Any], items: list[Any], workers: int) -> list[Any]:
    if workers <= 1 or len(items) <= 1:
        return [func(item) for item in items]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cache-publish") as pool:
        return list(pool.map(func, items))


def _sign_existing(session: Session, key: SecretKey, rows: Any) -> None:
    for row in rows:
        sigs = (row.sig or "").split()
        if any(s.startswith(key.name + ":") for s in sigs):
            continue
        narinfo = records.from_row({c: getattr(row, c) for c in records.COLUMNS}).signed(key)
        session.execute(update(NarInfoRow).where(NarInfoRow.store_path == row.store_path)
                        .values(sig=" ".join(narinfo.sigs)))


def _retry_uploads(session: Session, uploader: _Uploader, files: LocalFiles, rows: Any,
                   key: SecretKey | None) -> list[NarInfo]:
    """Upload recorded paths still kept only on local disk (an earlier upload failed)."""
    done: list[NarInfo] = []
    for row in rows:
        if row.storage != "local":
            continue
        path = files.path_of(row.url)
        if path is None or not path.is_file():
            continue
        narinfo = records.from_row({c: getattr(row, c) for c in records.COLUMNS})
        if key is not None:
            narinfo = narinfo.signed(key)
        if uploader.upload(narinfo, path) == "s3":
            session.execute(update(NarInfoRow).where(NarInfoRow.store_path == row.store_path)
                            .values(storage="s3"))
            done.append(narinfo)
    return done


def _drop_uploaded_local_files(session: Session, files: LocalFiles,
                               uploaded: list[NarInfo]) -> None:
    if not uploaded:
        return
    urls = {n.url for n in uploaded}
    still_local = set(session.scalars(select(NarInfoRow.url).where(
        NarInfoRow.url.in_(urls), NarInfoRow.storage == "local")))
    for url in urls - still_local:
        files.remove(url)


class _Uploader:
    """Uploads NAR + narinfo pairs; remembers failures instead of raising in threads."""

    def __init__(self, settings: Settings) -> None:
        self.store = S3Store(settings.cache_upload)
        self.failures: dict[str, str] = {}

    def upload(self, narinfo: NarInfo, file: Any) -> str:
        try:
            self.store.upload_file(file, narinfo.url, NAR_TYPE)
            # the narinfo goes last: a client that sees it can fetch the NAR
            self.store.put_bytes(f"{narinfo.hash_part}.narinfo", narinfo.render().encode(),
                                 NARINFO_TYPE)
        except S3Error as exc:
            self.failures[narinfo.store_path] = str(exc)
            return "local"
        return "s3"

    def ensure_cache_info(self, priority: int) -> None:
        try:
            if not self.store.exists("nix-cache-info"):
                self.store.put_bytes("nix-cache-info", cache_info(priority).encode(),
                                     "text/x-nix-cache-info")
        except S3Error as exc:
            log.warning("cache: cannot write nix-cache-info to S3: %s", exc)

