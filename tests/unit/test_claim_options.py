"""What one claim may take (``leases.ClaimOptions``): the rules that hold before any SQL runs."""

from __future__ import annotations

import dataclasses

import pytest

from circus.queue_runner.steps.leases import ClaimOptions


def test_a_claim_takes_at_least_one_step() -> None:
    with pytest.raises(ValueError, match="at least one step"):
        ClaimOptions(limit=0)
    with pytest.raises(ValueError, match="batch_limit"):
        ClaimOptions(limit=2, batch_limit=0)


def test_project_ids_only_narrow_a_trusted_claim() -> None:
    # a project restriction that trusted_only would silently ignore is refused
    with pytest.raises(ValueError, match="trusted_only"):
        ClaimOptions(project_ids=(1,))
    assert ClaimOptions(trusted_only=True, project_ids=(1,)).project_ids == (1,)


def test_the_batch_is_never_smaller_than_the_limit() -> None:
    assert ClaimOptions(limit=4).batch_size == 4
    assert ClaimOptions(limit=4, batch_limit=10).batch_size == 10
    assert ClaimOptions(limit=4, batch_limit=2).batch_size == 4


def test_trusted_claims_never_look_ahead() -> None:
    # look-ahead picks dependents without the trusted-evaluation check
    assert ClaimOptions().looks_ahead
    assert not ClaimOptions(lookahead=False).looks_ahead
    assert not ClaimOptions(trusted_only=True).looks_ahead


def test_a_retried_step_is_claimed_alone() -> None:
    options = ClaimOptions(limit=8, machine="m", batch_limit=20, critical_path=True)
    alone = options.alone()
    assert (alone.limit, alone.batch_size, alone.looks_ahead) == (1, 1, False)
    assert (alone.machine, alone.critical_path) == ("m", True)


def test_options_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        ClaimOptions().limit = 3  # type: ignore[misc]
