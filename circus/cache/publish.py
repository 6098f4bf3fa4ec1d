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
from collections import defaultdict
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from circus.cache import records
from circus.cache.files import LocalFiles, PackedNar
from circus.cache.s3 import S3Error, S3Store
from circus.common.config import Settings
from circus.common.errors import NotFound
from circus.common.models import Build, BuildOutput, Project
from circus.common.models import NarInfo as NarInfoRow
from circus.common.nix import store
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
    if session.get(Build, build_id) is None:
        raise NotFound(f"build {build_id} not found")
    return publish_builds(session, settings, [build_id])[build_id]


@dataclass
class _Batch:
    """The builds of one publish call whose project caches, and their paths."""

    results: dict[int, PublishResult]
    project_of: dict[int, int]
    #: build -> its output paths, by output name
    outputs_of: dict[int, list[str]]
    #: build -> the closure of its outputs (filled once Nix answered)
    closure_of: dict[int, list[str]] = field(default_factory=dict)

    def fail(self, path: str, error: str) -> None:
        """``path`` is not published: an error of every build whose closure holds it."""
        for build_id, paths in self.closure_of.items():
            if path in paths:
                self.results[build_id].errors[path] = error


def publish_builds(session: Session, settings: Settings, build_ids: list[int]
                   ) -> dict[int, PublishResult]:
    """:func:`publish_outputs` for many builds at once: one Nix call for all closures.

    The outputs' closure comes from Nix (:func:`_closures`); the paths not
    recorded yet are packed, signed and uploaded in parallel (:class:`_Packer`)
    and become rows (:func:`_new_rows`); failed uploads are settled
    (:func:`_settle_uploads`) before anything is recorded; then the rows are
    inserted, recorded paths signed and linked to the builds' projects
    (:func:`_link_and_report`), and uploaded NARs leave the local disk.
    """
    results = {build_id: PublishResult() for build_id in build_ids}
    if not (settings.cache.enabled or settings.cache_upload.enabled) or not build_ids:
        return results
    batch = _load_batch(session, build_ids, results)
    if not batch.outputs_of:
        return results
    infos = _closures(batch, settings.nix_environ())
    if infos is None:
        return results

    packing = _pack_new(session, settings, infos)
    key, existing, uploader, files = (packing.key, packing.existing, packing.uploader,
                                      packing.files)
    missing, outcomes = packing.missing, packing.outcomes
    values, added, uploaded = _new_rows(batch, missing, outcomes)
    if uploader is not None:
        uploaded += _settle_uploads(session, settings, uploader, files, existing.values(),
                                    key, uploaded)

    records.insert_rows(session, values)
    if key is not None:
        _sign_existing(session, key, existing.values())
    signed = _link_and_report(session, batch, existing.keys(), added, signing=key is not None)
    if uploader is not None:
        # the local copy of an uploaded NAR is dropped unless a local row still uses it
        _drop_uploaded_local_files(session, files, uploaded)
    if signed:
        session.execute(update(Build).where(Build.id.in_(signed)).values(signed=True))
    session.flush()
    return results


def _load_batch(session: Session, build_ids: list[int], results: dict[int, PublishResult]
                ) -> _Batch:
    """The builds of ``build_ids`` whose project caches, and the outputs of those that
    have outputs."""
    project_of = dict(session.execute(
        select(Build.id, Build.project_id).join(Project, Project.id == Build.project_id)
        .where(Build.id.in_(build_ids), Project.cache_enabled)).tuples().all())
    outputs_of: dict[int, list[str]] = defaultdict(list)
    for owner, path in session.execute(
            select(BuildOutput.build_id, BuildOutput.path)
            .where(BuildOutput.build_id.in_(list(project_of)))
            .order_by(BuildOutput.build_id, BuildOutput.name)).tuples():
        outputs_of[owner].append(path)
    return _Batch(results, project_of, dict(outputs_of))


def _closures(batch: _Batch, env: dict[str, str]) -> list[store.PathInfo] | None:
    """Every path of the outputs' closure, sorted by path (one Nix call), and each
    build's closure in ``batch``; None when the store cannot answer (then every
    output is an error: the builds' results stand, their outputs are just not in
    the cache). Outputs that are not valid are errors of their builds."""
    all_outputs = sorted({p for paths in batch.outputs_of.values() for p in paths})
    invalid = PublishResult()
    try:
        infos = _closure(all_outputs, env, invalid)
    except store.StoreError as exc:
        log.error("cache: cannot publish build(s) %s: %s", sorted(batch.outputs_of), exc)
        for build_id, paths in batch.outputs_of.items():
            batch.results[build_id].errors.update({p: str(exc) for p in paths})
        return None
    by_path = {info.path: info for info in infos}
    batch.closure_of = {build_id: _closure_in(by_path, paths)
                        for build_id, paths in batch.outputs_of.items()}
    for build_id, paths in batch.outputs_of.items():
        batch.results[build_id].errors.update(
            {p: e for p, e in invalid.errors.items() if p in paths})
    return infos


class _Packer:
    """Packs (and signs, and uploads) one path not recorded yet; runs in worker threads."""

    def __init__(self, settings: Settings, files: LocalFiles, key: SecretKey | None,
                 uploader: _Uploader | None) -> None:
        self.files = files
        self.key = key
        self.uploader = uploader
        self.compression = (settings.cache_upload.compression if uploader
                            else settings.cache.compression).value
        self.level = settings.cache.compression_level

    def pack(self, info: store.PathInfo) -> tuple[NarInfo, str] | str:
        """The path's narinfo and its storage (``local`` or ``s3``), or why it cannot
        be published."""
        try:
            packed = self.files.pack(info.path, self.compression, self.level)
        except (OSError, NarFormatError) as exc:
            return f"cannot archive {info.path}: {exc}"
        if packed.nar_hash != info.nar_hash or packed.nar_size != info.nar_size:
            # never serve bytes that disagree with what Nix recorded for the path
            return (f"NAR of {info.path} hashes to {packed.nar_hash} ({packed.nar_size} bytes)"
                    f" but Nix's database says {info.nar_hash} ({info.nar_size} bytes)")
        narinfo = _narinfo(info, packed)
        if self.key is not None:
            narinfo = narinfo.signed(self.key)
        storage = "local"
        if self.uploader is not None:
            storage = self.uploader.upload(narinfo, packed.file)
        return narinfo, storage


def _new_rows(batch: _Batch, missing: list[store.PathInfo],
              outcomes: list[tuple[NarInfo, str] | str]
              ) -> tuple[list[dict[str, Any]], set[str], list[NarInfo]]:
    """narinfo_cache rows of the packed paths, the paths added, and the narinfos
    uploaded; a path that could not be packed is an error of the builds needing it."""
    # a path new to the cache is attributed to the first build (by id) that needs it
    first_owner = {}
    for build_id in sorted(batch.closure_of, reverse=True):
        first_owner.update(dict.fromkeys(batch.closure_of[build_id], build_id))
    values: list[dict[str, Any]] = []
    uploaded: list[NarInfo] = []
    added: set[str] = set()
    for info, outcome in zip(missing, outcomes, strict=True):
        if isinstance(outcome, str):
            log.error("cache: not publishing %s: %s", info.path, outcome)
            batch.fail(info.path, outcome)
            continue
        narinfo, storage = outcome
        owner = first_owner[info.path]
        values.append(records.to_values(narinfo, storage=storage, build_id=owner,
                                        project_id=batch.project_of[owner]))
        added.add(info.path)
        if storage == "s3":
            uploaded.append(narinfo)
    return values, added, uploaded


def _settle_uploads(session: Session, settings: Settings, uploader: _Uploader,
                    files: LocalFiles, existing: Any, key: SecretKey | None,
                    uploaded: list[NarInfo]) -> list[NarInfo]:
    """Retry the uploads of recorded paths kept only on local disk, then act on the
    failures: :class:`UploadError` when ``fail_build_on_upload_error`` is set, else a
    warning (the path is served from local disk). Returns the narinfos the retry
    uploaded; writes ``nix-cache-info`` once anything is in S3."""
    retried = _retry_uploads(session, uploader, files, existing, key)
    failures = uploader.failures
    if failures:
        if settings.cache_upload.fail_build_on_upload_error:
            raise UploadError("; ".join(f"{p}: {e}" for p, e in failures.items()))
        for path, error in failures.items():
            log.warning("cache: upload of %s failed, serving it from local disk: %s",
                        path, error)
    if uploaded or retried:
        uploader.ensure_cache_info(settings.cache.priority)
    return retried


def _link_and_report(session: Session, batch: _Batch, existing: Collection[str],
                     added: set[str], *, signing: bool) -> list[int]:
    """Link each build's recorded paths (``existing`` before this call, or ``added``
    by it) to its project and fill in its result; returns the builds whose outputs
    are all recorded and signed."""
    signed: list[int] = []
    linked: dict[int, set[str]] = defaultdict(set)
    for build_id, paths in batch.closure_of.items():
        result = batch.results[build_id]
        recorded = [p for p in paths if p in existing or p in added]
        linked[batch.project_of[build_id]].update(recorded)
        result.published = recorded
        result.added = [p for p in paths if p in added]
        if signing and all(o in recorded for o in batch.outputs_of[build_id]):
            result.signed = True
            signed.append(build_id)
    # one statement per project and one for the batch, not two per build: 1,000 a
    # 500-build evaluation were most of the post-processor's CPU (~1 s of Python and
    # PostgreSQL's share, bench/build_overhead.py --e2e); both are idempotent set
    # updates, so the union of a project's builds' paths does the same
    for project_id, project_paths in sorted(linked.items()):
        records.link_projects(session, sorted(project_paths), project_id)
    records.serve_to_all(session, sorted({p for ps in linked.values() for p in ps}))
    return signed


def _closure_in(by_path: dict[str, store.PathInfo], roots: list[str]) -> list[str]:
    """The closure of ``roots`` within ``by_path``, in ``by_path``'s order."""
    seen: set[str] = set()
    stack = [p for p in roots if p in by_path]
    while stack:
        path = stack.pop()
        if path in seen:
            continue
        seen.add(path)
        stack.extend(r for r in by_path[path].references if r in by_path and r not in seen)
    return [p for p in by_path if p in seen]


def _closure(outputs: list[str], env: dict[str, str], result: PublishResult
             ) -> list[store.PathInfo]:
    try:
        return _closure_infos(outputs, env)
    except store.StoreError:
        # some output is not valid (never built, or collected): publish the others
        invalid = set(store.invalid_paths(outputs, env))
        if not invalid:
            raise
        for path in invalid:
            result.errors[path] = "not a valid store path (not built or garbage-collected)"
        return _closure_infos([p for p in outputs if p not in invalid], env)


def _closure_infos(outputs: list[str], env: dict[str, str]) -> list[store.PathInfo]:
    """Every path in the closure of ``outputs`` (which must be valid), sorted by path."""
    infos = store.path_infos(outputs, env, recursive=True)
    return [infos[path] for path in sorted(infos)]


def _narinfo(info: store.PathInfo, packed: PackedNar) -> NarInfo:
    return NarInfo(
        store_path=info.path, url=packed.url, compression=packed.compression,
        nar_hash=info.nar_hash, nar_size=info.nar_size, references=info.references,
        file_hash=packed.file_hash, file_size=packed.file_size, deriver=info.deriver,
        ca=info.ca)


@dataclass
class _Packing:
    """What publishing found recorded and packed anew (:func:`_pack_new`)."""
    key: SecretKey | None
    existing: dict[str, NarInfoRow]
    uploader: _Uploader | None
    files: LocalFiles
    missing: list[store.PathInfo]
    #: per path of ``missing``: (narinfo, storage), or why it was not packed
    outcomes: list[Any]


def _pack_new(session: Session, settings: Settings, infos: list[store.PathInfo]) -> _Packing:
    """Lock the cache records (shared), and pack (in parallel) the paths of ``infos`` it
    does not record yet."""
    records.lock_shared(session)
    key = signing_key(settings)
    existing = {row.store_path: row for row in session.execute(
        select(NarInfoRow).where(NarInfoRow.store_path.in_([i.path for i in infos]))
    ).scalars()}
    uploader = _Uploader(settings) if settings.cache_upload.enabled else None
    files = LocalFiles(settings.cache.cache_dir)
    packer = _Packer(settings, files, key, uploader)
    missing = [info for info in infos if info.path not in existing]
    outcomes = _run_parallel(packer.pack, missing, _workers(settings, len(missing)))
    return _Packing(key, existing, uploader, files, missing, outcomes)


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



def publish_paths(session: Session, settings: Settings, paths: list[str],
                  project_ids: Collection[int]) -> PublishResult:
    """Record (pack, sign, upload) store paths that need not be any build's outputs: a
    step's input closure (its .drv files, their sources and its inputs' outputs), which
    a remote worker substitutes from ``/nix-cache``. ``paths`` must be valid in this
    server's store; their closure is published with them. Each path is linked to
    ``project_ids`` (the projects whose builds wait for the step), so the shared cache
    does not serve what only hidden projects need. The caller commits.

    The server signs these as it signs build outputs: every path is already valid in
    its own store (evaluated here, built here, or imported only after the upload was
    verified), so the signature vouches for nothing the server does not hold.
    """
    result = PublishResult()
    if not settings.cache.enabled or not paths:
        return result
    env = settings.nix_environ()
    # Nix 2.8: with --derivation any other path stands for its deriver; so two queries
    drvs = sorted({p for p in paths if p.endswith(".drv")})
    others = sorted({p for p in paths if not p.endswith(".drv")})
    found = store.path_infos(others, env, recursive=True) if others else {}
    if drvs:
        found.update(store.path_infos(drvs, env, recursive=True, derivations=True))
    infos = [found[path] for path in sorted(found)]
    packing = _pack_new(session, settings, infos)
    key, existing, uploader, files = (packing.key, packing.existing, packing.uploader,
                                      packing.files)
    missing, outcomes = packing.missing, packing.outcomes
    owner = min(project_ids) if project_ids else None
    values: list[dict[str, Any]] = []
    uploaded: list[NarInfo] = []
    for info, outcome in zip(missing, outcomes, strict=True):
        if isinstance(outcome, str):
            log.error("cache: not publishing %s: %s", info.path, outcome)
            result.errors[info.path] = outcome
            continue
        narinfo, storage = outcome
        values.append({**records.to_values(narinfo, storage=storage, build_id=None,
                                           project_id=owner), "worker_only": True})
        result.added.append(info.path)
        if storage == "s3":
            uploaded.append(narinfo)
    if uploader is not None and uploaded:
        uploader.ensure_cache_info(settings.cache.priority)
    records.insert_rows(session, values)
    if key is not None:
        _sign_existing(session, key, existing.values())
        result.signed = not result.errors
    result.published = [i.path for i in infos if i.path in existing or i.path in result.added]
    for project_id in sorted(project_ids):
        records.link_projects(session, result.published, project_id)
    if uploader is not None:
        _drop_uploaded_local_files(session, files, uploaded)
    session.flush()
    return result
