"""Send an evaluation's derivations to the server when this host's Nix store is not its.

Nix writes the .drv files of an evaluation into the evaluating host's store, and
the queue runner's dispatcher reads them from the server's. An evaluator on
another host (``evaluator.upload_derivations_to``) therefore hands the server,
before it commits the new builds, every path of their .drv closure (the .drv
files and the sources they name) that the server lacks: it asks which are
missing, exports those, and uploads them through ``/api/v1/workers/derivations``.
A failed upload fails the evaluation and nothing is committed, so no build is
ever queued whose derivation the dispatcher cannot read.
"""

from __future__ import annotations

import logging
import socket
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass

import requests

from circus.common.config import EvaluatorSettings, Settings
from circus.common.nix import store
from circus.common.nix.transfer import export_to_file
from circus.worker.client import ApiError, WorkerApi

log = logging.getLogger(__name__)

#: paths per "which are missing" question (the server answers at most 20,000)
QUERY_BATCH = 10_000


class UploadFailed(Exception):
    """The derivations did not reach the server; the message says why."""


@dataclass(frozen=True)
class UploadTarget:
    server_url: str
    token: str | None
    request_timeout_secs: float
    ca_file: str | None


def uploads_derivations(settings: Settings) -> bool:
    return settings.evaluator.upload_derivations_to is not None


def _api(config: EvaluatorSettings) -> WorkerApi:
    assert config.upload_derivations_to is not None
    target = UploadTarget(config.upload_derivations_to, config.upload_token,
                          float(config.upload_timeout_secs), config.upload_ca_file)
    return WorkerApi(target, config.upload_name or socket.gethostname())


def upload_derivations(settings: Settings, evaluation_id: int, drv_paths: Iterable[str]
                       ) -> int:
    """Upload what the server lacks of the closure of ``drv_paths`` (the new builds of
    evaluation ``evaluation_id``, which the server roots them for); returns how many
    paths were sent. Raises :class:`UploadFailed`."""
    roots = sorted(set(drv_paths))
    if not roots:
        return 0
    env = settings.nix_environ()
    api = _api(settings.evaluator)
    try:
        # dependencies first: the order nix-store --import needs
        closure = store.requisites(roots, env)
        missing: set[str] = set()
        for start in range(0, len(closure), QUERY_BATCH):
            missing.update(api.missing_derivations(closure[start:start + QUERY_BATCH],
                                                   evaluation_id))
        if not missing:
            return 0
        order = [p for p in closure if p in missing]
        with tempfile.TemporaryFile(prefix="circus-derivations-") as spool:
            export_to_file(order, spool, env)
            spool.seek(0)
            imported = api.upload_derivations(spool, evaluation_id)
    except (store.StoreError, ApiError, requests.RequestException) as exc:
        raise UploadFailed(f"uploading the derivations to "
                           f"{settings.evaluator.upload_derivations_to} failed: {exc}") from None
    log.info("uploaded %d of the %d path(s) of the .drv closure of %d build(s)",
             len(imported), len(closure), len(roots))
    return len(imported)
