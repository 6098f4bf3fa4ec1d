"""Which machine may build which step: Hydra's capability rule and queue classes.

A step's *queue class* names what it needs: ``<system>`` or
``<system>.<f1>+<f2>`` with its required features sorted. Every consumer
(local worker, SSH worker, the agent gateway) serves the classes its
capabilities admit, so the rule lives here once.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from circus.common.config import Settings
from circus.common.nix.environment import (
    DEFAULT_SYSTEM_FEATURES,
    current_system,
    system_features_from_nix_conf,
)

#: derivations Nix builds itself (``builtin:fetchurl``); any machine may take them
BUILTIN_SYSTEM = "builtin"


def queue_class_name(system: str, required_features: Iterable[str]) -> str:
    features = sorted(set(required_features))
    return f"{system}.{'+'.join(features)}" if features else system


def parse_queue_class(name: str) -> tuple[str, list[str]]:
    """Inverse of :func:`queue_class_name` (systems contain ``-``, never ``.``)."""
    system, sep, features = name.partition(".")
    return system, features.split("+") if sep and features else []


@dataclass(frozen=True)
class Capabilities:
    systems: frozenset[str]
    supported_features: frozenset[str] = field(default_factory=frozenset)
    mandatory_features: frozenset[str] = field(default_factory=frozenset)

    def can_build(self, system: str, required_features: Iterable[str]) -> bool:
        """Hydra's rule: the system matches (or is builtin), every required feature is
        supported or mandatory, and every mandatory feature is required (a machine
        reserved for ``kvm`` jobs takes only those)."""
        required = set(required_features)
        if system != BUILTIN_SYSTEM and system not in self.systems:
            return False
        if not required <= (self.supported_features | self.mandatory_features):
            return False
        return self.mandatory_features <= required

    def can_serve(self, queue_class: str) -> bool:
        system, features = parse_queue_class(queue_class)
        return self.can_build(system, features)

    def to_json(self) -> dict[str, Any]:
        return {"systems": sorted(self.systems),
                "supported_features": sorted(self.supported_features),
                "mandatory_features": sorted(self.mandatory_features)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Capabilities:
        return cls(frozenset(data.get("systems") or ()),
                   frozenset(data.get("supported_features") or ()),
                   frozenset(data.get("mandatory_features") or ()))

    def base_classes(self) -> list[str]:
        """Classes this machine serves without any feature (subscribed from the start)."""
        if self.mandatory_features:
            return [queue_class_name(s, self.mandatory_features) for s in sorted(self.systems)]
        return sorted(self.systems | {BUILTIN_SYSTEM})


def local_capabilities(settings: Settings) -> Capabilities:
    """What the runner host's own workers build (``local_systems``/``local_features``)."""
    runner = settings.queue_runner
    systems = runner.local_systems or [current_system()]
    features = runner.local_features
    if features is None:
        features = system_features_from_nix_conf()
    if features is None:
        features = list(DEFAULT_SYSTEM_FEATURES)
    return Capabilities(frozenset(systems), frozenset(features),
                        frozenset(runner.local_mandatory_features))
