"""Derivations from evaluators on other hosts: which are missing, and their import.

A ``circus-evaluator`` whose Nix store is not the server's (``evaluator.
upload_derivations_to``) writes the .drv files of an evaluation into its own
store; the queue runner's dispatcher reads them from the server's. Before the
evaluator commits the new builds it asks which paths of their .drv closure the
server lacks and uploads those as one ``nix-store --export`` stream, so no
build is ever queued whose derivation the dispatcher cannot read.

It authenticates like a remote build worker (a ``remote_workers.auth_tokens``
token and a name, :func:`circus.remote_workers.service.authenticate`). The
upload is spooled in full and imported only when every path in it is a .drv or
a source one of its .drv files names, at the store path Nix computes from its
content and references (``nix.export.verify_derivation_export``): a token holder
cannot slip a forged derivation in under a legitimate one's path. The uploaded
.drv files are rooted under the evaluation's GC roots directory, as an
evaluation on the server's own store roots them, and released with them. Only an
evaluation in progress takes them (:func:`require_running_evaluation`).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from typing import IO

from sqlalchemy import select
from sqlalchemy.orm import Session

from circus.common.config import Settings
from circus.common.enums import EvaluationStatus
from circus.common.errors import Conflict, InvalidInput, NotFound, PermissionDenied
from circus.common.models import Evaluation
from circus.common.nix import gcroots, store
from circus.common.nix.export import ExportRefused, verify_derivation_export
from circus.common.nix.transfer import import_file_sync
from circus.remote_workers.service import RemoteWorker, spool_upload

log = logging.getLogger(__name__)

#: paths per ``missing`` question, at most (the client asks in batches)
MAX_QUERY_PATHS = 20_000


def require_running_evaluation(session: Session, evaluation_id: int) -> None:
    """Derivations are rooted for an evaluation in progress only: the evaluator uploads
    before it commits the evaluation's builds, so its committed status is still
    ``running``. A finished evaluation, or an id not given out yet, would root them
    for nobody (a token holder filling the server's store past its collections)."""
    status = session.scalar(select(Evaluation.status).where(Evaluation.id == evaluation_id))
    if status is None:
        raise NotFound(f"no evaluation {evaluation_id}")
    if status is not EvaluationStatus.running:
        raise Conflict(f"evaluation {evaluation_id} is {status.value}: only a running "
                       "evaluation takes derivations")


def missing_paths(settings: Settings, paths: Sequence[str], evaluation_id: int) -> list[str]:
    """Those of ``paths`` that are not valid in the server's store. The .drv files among
    the others are rooted for ``evaluation_id``, as a local evaluation roots each of its
    derivations: one the server has already (another evaluation's, say) stays until
    this evaluation's builds are done too (those it lacks are rooted once uploaded)."""
    if len(paths) > MAX_QUERY_PATHS:
        raise InvalidInput(f"at most {MAX_QUERY_PATHS} paths per question")
    try:
        checked = store.checked_paths(paths)
    except store.StoreError as exc:
        raise InvalidInput(str(exc)) from None
    missing = store.invalid_paths(checked, settings.nix_environ())
    absent = set(missing)
    _root(settings, evaluation_id, [p for p in checked if p not in absent])
    return missing


def _root(settings: Settings, evaluation_id: int, paths: Sequence[str]) -> None:
    # through Nix (its daemon: the server need not write Nix's state directory), into
    # the directory the beat removes once the evaluation's builds are done
    gcroots.root_through_nix(settings.evaluator.gc_roots_dir(evaluation_id),
                             [p for p in paths if p.endswith(".drv")],
                             settings.nix_environ())


def import_derivations(settings: Settings, uploader: RemoteWorker, stream: IO[bytes],
                       evaluation_id: int) -> list[str]:
    """Spool the upload, refuse it unless it holds only derivations and their sources,
    each at the store path of its content, import it and root the derivations for
    ``evaluation_id``; returns the paths imported."""
    owner = f"evaluator {uploader.name}"
    with tempfile.TemporaryFile(prefix="circus-derivations-") as spool:
        spool_upload(stream, spool, settings.remote_workers.max_upload_size)
        try:
            entries = verify_derivation_export(spool, owner)
        except ExportRefused as exc:
            log.warning("%s", exc)
            raise PermissionDenied(str(exc)) from None
        try:
            imported = import_file_sync(spool, settings.nix_environ())
        except store.StoreError as exc:
            # Nix's own checks (a .drv whose outputs are not its own, ...) or its store
            log.warning("%s: %s", owner, exc)
            raise Conflict(f"the server's store did not take the upload: {exc}") from None
    derivations = [e.path for e in entries if e.path.endswith(".drv")]
    # right after the import: no garbage collection between it and the build loses them
    _root(settings, evaluation_id, derivations)
    log.info("%s uploaded %d path(s) (%d derivations) for evaluation %d", owner,
             len(imported), len(derivations), evaluation_id)
    return imported
