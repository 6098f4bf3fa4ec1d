"""Which machine gets a step: the capability rule, the PSI gate and the strategy (SPEC §4).

Shared by the agent gateway (connected agents) and the SSH worker (remote builders).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from circus.common.enums import SchedulingStrategy
from circus.queue_runner.routing.capabilities import Capabilities


@dataclass(frozen=True)
class Candidate:
    """What the choice needs to know about one machine (agent or SSH builder)."""

    key: str
    capabilities: Capabilities
    speed_factor: float
    cpu_count: int
    max_jobs: int
    current_jobs: int
    #: PSI avg10 values from the last heartbeat, None when the host has no PSI
    pressure: tuple[float, float, float] | None
    #: seconds since the last heartbeat, None before the first
    heartbeat_age: float | None
    disabled: bool = False


def under_pressure(candidate: Candidate, threshold: float, heartbeat_ttl: float) -> bool:
    """Any PSI avg10 above the threshold — judged only on a fresh heartbeat.

    A stale heartbeat says nothing about now, so it never penalises an agent.
    """
    if candidate.pressure is None or candidate.heartbeat_age is None:
        return False
    if candidate.heartbeat_age > heartbeat_ttl:
        return False
    return any(value > threshold for value in candidate.pressure)


def score(candidate: Candidate, strategy: SchedulingStrategy) -> float:
    if strategy is SchedulingStrategy.cpu_core_count_with_speed_factor:
        return candidate.cpu_count * candidate.speed_factor
    if strategy is SchedulingStrategy.dynamic:
        return (candidate.max_jobs - candidate.current_jobs) * candidate.speed_factor
    return candidate.speed_factor


def choose(candidates: Iterable[Candidate], queue_class: str, *,
           strategy: SchedulingStrategy, psi_threshold: float, heartbeat_ttl: float,
           ) -> Candidate | None:
    """The best machine that may take a step of ``queue_class`` now, or None."""
    eligible = [
        c for c in candidates
        if not c.disabled
        and c.current_jobs < c.max_jobs
        and c.capabilities.can_serve(queue_class)
        and not under_pressure(c, psi_threshold, heartbeat_ttl)
    ]
    if not eligible:
        return None
    # ties go to the least busy machine, then a stable order
    return max(eligible, key=lambda c: (score(c, strategy), -c.current_jobs, c.key))
