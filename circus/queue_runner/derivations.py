"""Parsed derivations, cached: a ``.drv`` never changes once it is in the store."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from circus.common.nix.derivation import read_derivation


@dataclass(frozen=True)
class DrvInfo:
    """What scheduling needs from a derivation (the environment is dropped)."""

    drv_path: str
    system: str
    required_features: tuple[str, ...]
    input_drvs: tuple[str, ...]
    outputs: tuple[tuple[str, str], ...]
    is_fod: bool

    @property
    def output_paths(self) -> dict[str, str]:
        return dict(self.outputs)


class DrvCache:
    """A bounded LRU of parsed derivations, safe to share between threads."""

    def __init__(self, max_entries: int = 200_000) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[str, DrvInfo] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, drv_path: str) -> DrvInfo:
        with self._lock:
            info = self._entries.get(drv_path)
            if info is not None:
                self._entries.move_to_end(drv_path)
                return info
        drv = read_derivation(drv_path)
        info = DrvInfo(
            drv_path=drv_path,
            system=drv.system,
            required_features=tuple(sorted(set(drv.required_features))),
            input_drvs=tuple(sorted(drv.input_drvs)),
            outputs=tuple(sorted((name, out.path) for name, out in drv.outputs.items())),
            is_fod=drv.is_fixed_output,
        )
        with self._lock:
            self._entries[drv_path] = info
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return info
