"""The dispatcher's batches over a large evaluation: small first, then growing."""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from circus.common.config import Settings
from circus.queue_runner.derivations import DrvCache
from circus.queue_runner.dispatch.dispatcher import BATCH_GROWTH, FIRST_BATCH, Dispatcher
from tests.queue_runner.factories import instantiate, make_builds

JOBS = 260

INDEPENDENT = """
{ nonce, count }:
builtins.listToAttrs (builtins.genList (i: {
  name = "j${toString i}";
  value = derivation {
    name = "independent-${toString i}";
    inherit nonce;
    builder = "/bin/sh";
    args = [ "-c" "echo ${toString i} > $out" ];
    system = builtins.currentSystem;
  };
}) count)
"""


def test_batches_grow_after_the_first(committed_db: sessionmaker[Session], engine: Engine,
                                      qr_settings: Callable[..., Settings],
                                      nix_env: dict[str, str], nonce: str, tmp_path: Path,
                                      caplog: pytest.LogCaptureFixture) -> None:
    # the first batch starts building at once; the next ones grow, so what the first
    # left out becomes claimable within a second, not after one transaction stepping
    # everything else
    expr = tmp_path / "independent.nix"
    expr.write_text(INDEPENDENT)
    drvs = instantiate([f"j{i}" for i in range(JOBS)], nonce, nix_env, expr=expr,
                       args={"count": JOBS})
    with committed_db() as session:
        make_builds(session, drvs, notify=False)
    settings = qr_settings(queue_runner={"dispatch_batch_size": 2000})
    dispatcher = Dispatcher(settings, committed_db, engine, DrvCache(), threading.Event(),
                            publish=None)
    with caplog.at_level(logging.INFO, logger="circus.queue_runner.dispatch.dispatcher"):
        assert dispatcher.dispatch_pending() == JOBS
    sizes = [int(found.group(1)) for record in caplog.records
             if (found := re.match(r"stepped (\d+) build", record.getMessage()))]
    second = FIRST_BATCH * BATCH_GROWTH
    assert sizes == [FIRST_BATCH, second, JOBS - FIRST_BATCH - second]
