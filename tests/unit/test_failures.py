"""One failure classifier: the agent's outcome of a whole ``nix-store --realise`` and
the local/SSH status of one derivation come from the same reading of Nix's messages."""

from __future__ import annotations

import pytest

from circus.common.enums import BuildStatus
from circus.common.nix.failures import Kind, classify, failure_status
from circus.common.nix.realise import Outcome
from circus.common.nix.realise import classify as classify_realise

DRV = "/nix/store/" + "a" * 32 + "-x.drv"


@pytest.mark.parametrize(("tail", "returncode", "oom", "status", "outcome"), [
    (f"error: builder for '{DRV}' failed with exit code 3", 100, 0,
     BuildStatus.failed, Outcome.failed),
    (f"error: building of '{DRV}!out' timed out after 2 seconds\n"
     f"error: build of '{DRV}' failed", 101, 0, BuildStatus.timeout, Outcome.timed_out),
    (f"error: builder for '{DRV}' failed due to signal 9 (Killed)", 100, 1,
     BuildStatus.oom_killed, Outcome.oom_killed),
    # SIGKILL without the OOM counter moving is an ordinary failure
    (f"error: builder for '{DRV}' failed due to signal 9 (Killed)", 100, 0,
     BuildStatus.failed, Outcome.failed),
])
def test_agents_and_local_builders_agree(tail: str, returncode: int, oom: int,
                                         status: BuildStatus, outcome: Outcome) -> None:
    kind, _, signal_number = classify(tail)
    assert failure_status(kind, signal_number, oom)[0] is status
    got, message = classify_realise(returncode, tail, log_limit_hit=False, cancelled=False,
                                    oom_before=5, oom_after=5 + oom, failed_marker=False)
    assert got is outcome
    assert message


def test_nix_that_could_not_start_is_aborted_for_agents() -> None:
    tail = "error: cannot open connection to remote store 'daemon'"
    assert classify(tail)[0] is Kind.failed
    outcome, message = classify_realise(1, tail, log_limit_hit=False, cancelled=False,
                                        oom_before=None, oom_after=None, failed_marker=False)
    assert outcome is Outcome.aborted
    assert message == "cannot open connection to remote store 'daemon'"
