from __future__ import annotations

from dataclasses import replace

from circus.common.enums import SchedulingStrategy
from circus.queue_runner.routing.capabilities import Capabilities
from circus.queue_runner.routing.strategy import Candidate, choose

BASE = Candidate(key="a", capabilities=Capabilities(frozenset({"x86_64-linux"})),
                 speed_factor=1.0, cpu_count=2, max_jobs=2, current_jobs=0,
                 pressure=(0.0, 0.0, 0.0), heartbeat_age=1.0)


def pick(candidates: list[Candidate], queue_class: str = "x86_64-linux",
         strategy: SchedulingStrategy = SchedulingStrategy.speed_factor_only) -> str | None:
    chosen = choose(candidates, queue_class, strategy=strategy, psi_threshold=80,
                    heartbeat_ttl=60)
    return chosen.key if chosen else None


def test_speed_factor_wins() -> None:
    slow = replace(BASE, key="slow")
    fast = replace(BASE, key="fast", speed_factor=4.0)
    assert pick([slow, fast]) == "fast"


def test_never_above_max_jobs() -> None:
    full = replace(BASE, key="full", speed_factor=9.0, current_jobs=2)
    free = replace(BASE, key="free")
    assert pick([full, free]) == "free"
    assert pick([full]) is None


def test_psi_gate_and_stale_heartbeats() -> None:
    hot = replace(BASE, key="hot", speed_factor=9.0, pressure=(95.0, 0.0, 0.0))
    cool = replace(BASE, key="cool")
    assert pick([hot, cool]) == "cool"
    # a stale heartbeat is ignored, never held against the agent
    stale = replace(hot, heartbeat_age=600.0)
    assert pick([stale, cool]) == "hot"
    no_psi = replace(hot, pressure=None)
    assert pick([no_psi, cool]) == "hot"


def test_mandatory_features_route_exclusively() -> None:
    kvm = replace(BASE, key="kvm", speed_factor=9.0, capabilities=Capabilities(
        frozenset({"x86_64-linux"}), mandatory_features=frozenset({"kvm"})))
    plain = replace(BASE, key="plain")
    assert pick([kvm, plain], "x86_64-linux") == "plain"
    assert pick([kvm, plain], "x86_64-linux.kvm") == "kvm"


def test_strategies() -> None:
    wide = replace(BASE, key="wide", cpu_count=32, speed_factor=1.0, max_jobs=8, current_jobs=7)
    quick = replace(BASE, key="quick", cpu_count=2, speed_factor=3.0, max_jobs=4)
    assert pick([wide, quick], strategy=SchedulingStrategy.speed_factor_only) == "quick"
    assert pick([wide, quick],
                strategy=SchedulingStrategy.cpu_core_count_with_speed_factor) == "wide"
    assert pick([wide, quick], strategy=SchedulingStrategy.dynamic) == "quick"


def test_disabled_agents_are_skipped() -> None:
    assert pick([replace(BASE, disabled=True)]) is None
