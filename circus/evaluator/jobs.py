"""What an evaluation produces: job records, per-job errors, and facts read from .drv files.

Both evaluation programs (nix-eval-jobs and the built-in walker) produce the same
records, in nix-eval-jobs' JSON shape; :func:`job_from_record` turns one into a
:class:`Job`. Facts the record lacks (fixed-output, required features, aggregate
flag, input derivations) come from the ``.drv`` file, scanned with a few regular
expressions instead of a full parse: at 50,000 jobs a full parse costs seconds.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any


def attr_name(path: list[str]) -> str:
    """nix-eval-jobs' ``attr``: names joined with dots, a name holding a dot quoted."""
    joined = ".".join(path)
    if joined.count(".") == len(path) - 1:
        return joined
    return ".".join(f'"{name}"' if "." in name else name for name in path)


@dataclass(frozen=True, slots=True)
class DrvFacts:
    """What the importer needs from a .drv file."""

    is_fod: bool
    required_features: list[str]
    is_aggregate: bool
    input_drvs: list[str]
    #: an aggregate's ``constituents`` as the builder sees them: output paths of the
    #: derivations, and job names (patterns with ``_hydraGlobConstituents``)
    constituents: list[str] = field(default_factory=list)
    glob_constituents: bool = False


@dataclass(slots=True)
class Job:
    """One job of an evaluation (slots: an evaluation may hold 50,000 of them)."""

    name: str
    attr_path: list[str]
    nix_name: str
    system: str
    drv_path: str
    outputs: dict[str, str]
    meta: dict[str, Any] = field(default_factory=dict)
    #: drv paths of an aggregate's constituents, and constituents named by job
    constituents: list[str] = field(default_factory=list)
    named_constituents: list[str] = field(default_factory=list)
    #: ``_hydraGlobConstituents``: the named constituents are fnmatch patterns
    glob_constituents: bool = False
    #: from the program when it says; otherwise filled in from the .drv
    required_features: list[str] | None = None
    facts: DrvFacts | None = None
    #: an aggregate's constituents named by output path (see :meth:`constituents_from_drv`)
    constituent_outputs: list[str] = field(default_factory=list)
    #: what the program found wrong with the constituents ("x: does not exist")
    constituent_errors: list[str] = field(default_factory=list)
    #: whether the program reported constituents at all (nix-eval-jobs < 2.25 does not)
    reports_constituents: bool = True

    @property
    def is_aggregate(self) -> bool:
        if self.facts is not None and self.facts.is_aggregate:
            return True
        return bool(self.constituents or self.named_constituents)

    def constituents_from_drv(self) -> None:
        """Take an aggregate's constituents from its .drv when the program did not report
        them (nix-eval-jobs before ``--constituents``): the ``constituents`` attribute
        is in the builder's environment, derivations as output paths, names as written."""
        facts = self.facts
        if self.reports_constituents or facts is None or not facts.is_aggregate:
            return
        self.constituent_outputs = [c for c in facts.constituents if c.startswith("/")]
        self.named_constituents = [c for c in facts.constituents if not c.startswith("/")]
        self.glob_constituents = facts.glob_constituents

    @property
    def is_fod(self) -> bool:
        return self.facts is not None and self.facts.is_fod

    @property
    def features(self) -> list[str]:
        if self.required_features is not None:
            return self.required_features
        return self.facts.required_features if self.facts is not None else []


@dataclass(frozen=True)
class JobError:
    name: str
    message: str


class RecordError(ValueError):
    """A record from the evaluation program that is not what nix-eval-jobs prints."""


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return value.split()
    if isinstance(value, list):
        return [str(v) for v in value if isinstance(v, str | int | float)]
    return []


def job_from_record(record: dict[str, Any]) -> Job | JobError:
    path = record.get("attrPath")
    if not isinstance(path, list) or not all(isinstance(p, str) for p in path):
        attr = record.get("attr")
        if not isinstance(attr, str):
            raise RecordError(f"record without attr/attrPath: {str(record)[:200]}")
        name = attr
        path = attr.split(".")
    else:
        name = attr_name(path)
    aggregate_failed = "error" in record and "constituents" in record and "drvPath" in record
    if "error" in record and not aggregate_failed:
        return JobError(name, str(record["error"]).strip())
    drv_path = record.get("drvPath")
    if not isinstance(drv_path, str) or not drv_path.endswith(".drv"):
        raise RecordError(f"job {name!r} has no drvPath")
    raw_outputs = record.get("outputs") or {}
    if not isinstance(raw_outputs, dict):
        raise RecordError(f"job {name!r}: outputs is not an object")
    # content-addressed outputs have no path before they are built (null)
    outputs = {k: v for k, v in raw_outputs.items() if isinstance(v, str)}
    meta = record.get("meta")
    features = record.get("requiredSystemFeatures")
    constituents = record.get("constituents")
    named = record.get("namedConstituents")
    return Job(
        name=name,
        attr_path=path,
        nix_name=str(record.get("name") or ""),
        system=str(record.get("system") or ""),
        drv_path=drv_path,
        outputs=outputs,
        meta=meta if isinstance(meta, dict) else {},
        constituents=[c for c in constituents if isinstance(c, str)] if constituents else [],
        named_constituents=[c for c in named if isinstance(c, str)] if named else [],
        glob_constituents=record.get("globConstituents") is True,
        required_features=_strings(features) if features is not None else None,
        # nix-eval-jobs >= 2.25 resolves named constituents itself: a broken one leaves
        # the aggregate's record whole, with one "name: reason" line per problem in error
        constituent_errors=sorted({line.strip() for line in str(record["error"]).splitlines()
                                   if line.strip()}) if aggregate_failed else [],
        reports_constituents="constituents" in record or "namedConstituents" in record,
    )


def plain_job(path: list[str], record: dict[str, Any]) -> Job | None:
    """The Job :func:`job_from_record` makes of the commonest record, the built-in
    walker's for a derivation that is no aggregate (exactly ``name``, ``system``,
    ``drvPath``, ``outputs`` with string paths and ``meta``), without its checks for the
    rarer shapes; None for any other record. ``path`` is a JSON list of strings.

    Why: at 50,000 jobs the generic checks were a tenth of the evaluator's own CPU time,
    which competes with Nix for the cores."""
    if len(record) != 5:
        return None
    name = record.get("name")
    system = record.get("system")
    drv_path = record.get("drvPath")
    outputs = record.get("outputs")
    meta = record.get("meta")
    if (type(name) is not str or not name or type(system) is not str
            or type(drv_path) is not str or not drv_path.endswith(".drv")
            or type(outputs) is not dict or type(meta) is not dict):
        return None
    for output_path in outputs.values():
        if type(output_path) is not str:
            return None
    return Job(name=attr_name(path), attr_path=path, nix_name=name, system=system,
               drv_path=drv_path, outputs=outputs, meta=meta, reports_constituents=False)


# ---------------------------------------------------------------------------
# .drv scanning (ATerm: Derive([outputs],[inputDrvs],[inputSrcs],system,builder,[args],[env]))

# an output: ("name","path","hashAlgo","hash") whose hash is set: a fixed output
_FIXED_OUTPUT = re.compile(rb'\("[^"]*","[^"]*","[^"]*","[^"]+"\)')
# an input derivation entry: ("/nix/store/...drv",[ -- only inputDrvs have this shape
_INPUT_DRV = re.compile(rb'\("(/nix/store/[^"]+\.drv)",\[')
_ENV_FEATURES = re.compile(rb'\("requiredSystemFeatures","((?:[^"\\]|\\.)*)"\)')
_ENV_CONSTITUENTS = re.compile(rb'\("constituents","((?:[^"\\]|\\.)*)"\)')


#: the facts of a derivation without any of them (shared; never modified)
_PLAIN = DrvFacts(is_fod=False, required_features=[], is_aggregate=False, input_drvs=[])


def scan_derivation(data: bytes | str) -> DrvFacts:
    """Facts from a .drv's text; cheap substring tests first (this runs per job)."""
    if isinstance(data, str):
        data = data.encode()
    if not data.startswith(b"Derive(["):
        raise ValueError("not a derivation")
    outputs = data[8:data.find(b"],[", 8)]
    features: list[str] = []
    if b'"requiredSystemFeatures"' in data:
        match = _ENV_FEATURES.search(data)
        if match:
            features = match.group(1).decode().split()
    is_aggregate = b'("_hydraAggregate","1")' in data
    constituents: list[str] = []
    if is_aggregate and (match := _ENV_CONSTITUENTS.search(data)):
        constituents = match.group(1).decode().split()
    is_fod = _FIXED_OUTPUT.search(outputs) is not None
    # interned: jobs share input derivations (stdenv and the like), and the importer
    # keeps them until the evaluation's dependency edges are written
    input_drvs = ([sys.intern(m.decode()) for m in _INPUT_DRV.findall(data)]
                  if b'.drv",[' in data else [])
    if not (is_fod or features or is_aggregate or input_drvs):
        return _PLAIN  # most jobs of a large jobset: one shared object
    return DrvFacts(
        is_fod=is_fod,
        required_features=features,
        is_aggregate=is_aggregate,
        constituents=constituents,
        glob_constituents=is_aggregate and b'("_hydraGlobConstituents","1")' in data,
        input_drvs=input_drvs,
    )


def read_facts(drv_path: str) -> DrvFacts | None:
    try:
        fd = os.open(drv_path, os.O_RDONLY)
        try:
            data = os.read(fd, 1 << 20)
            while len(data) % (1 << 20) == 0 and data:
                more = os.read(fd, 1 << 20)
                if not more:
                    break
                data += more
        finally:
            os.close(fd)
        return scan_derivation(data)
    except (OSError, ValueError):
        return None
