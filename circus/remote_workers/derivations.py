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
a source one of its .drv files names (``nix.export.verify_derivation_export``).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from typing import IO

from circus.common.config import Settings
from circus.common.errors import InvalidInput, PermissionDenied
from circus.common.nix import store
from circus.common.nix.export import ExportRefused, verify_derivation_export
from circus.common.nix.transfer import import_file_sync
from circus.remote_workers.service import RemoteWorker, spool_upload

log = logging.getLogger(__name__)

#: paths per ``missing`` question, at most (the client asks in batches)
MAX_QUERY_PATHS = 20_000


def missing_paths(settings: Settings, paths: Sequence[str]) -> list[str]:
    """Those of ``paths`` that are not valid in the server's store."""
    if len(paths) > MAX_QUERY_PATHS:
        raise InvalidInput(f"at most {MAX_QUERY_PATHS} paths per question")
    try:
        checked = store.checked_paths(paths)
    except store.StoreError as exc:
        raise InvalidInput(str(exc)) from None
    return store.invalid_paths(checked, settings.nix_environ())


def import_derivations(settings: Settings, uploader: RemoteWorker, stream: IO[bytes]
                       ) -> list[str]:
    """Spool the upload, refuse it unless it holds only derivations and their sources,
    then import it; returns the paths imported."""
    owner = f"evaluator {uploader.name}"
    with tempfile.TemporaryFile(prefix="circus-derivations-") as spool:
        spool_upload(stream, spool, settings.remote_workers.max_upload_size)
        try:
            entries = verify_derivation_export(spool, owner)
        except ExportRefused as exc:
            log.warning("%s", exc)
            raise PermissionDenied(str(exc)) from None
        imported = import_file_sync(spool, settings.nix_environ())
    log.info("%s uploaded %d path(s) (%d derivations)", owner, len(imported),
             sum(1 for e in entries if e.path.endswith(".drv")))
    return imported
