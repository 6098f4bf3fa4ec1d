"""Parse ``.drv`` files (Nix's ATerm serialisation of a derivation)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

_TOKEN = re.compile(r'"((?:[^"\\]|\\.)*)"|([\[\]\(\),])|(Derive)', re.S)
_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "\\": "\\", '"': '"'}
_ESCAPE_RE = re.compile(r"\\(.)", re.S)


class DerivationParseError(ValueError):
    pass


@dataclass(frozen=True)
class DerivationOutput:
    path: str
    hash_algo: str
    hash: str


@dataclass(frozen=True)
class Derivation:
    outputs: dict[str, DerivationOutput]
    input_drvs: dict[str, list[str]]
    input_srcs: list[str]
    system: str
    builder: str
    args: list[str]
    env: dict[str, str] = field(repr=False)

    @property
    def is_fixed_output(self) -> bool:
        """A fixed-output derivation declares its output hash (``outputHash``)."""
        return any(o.hash for o in self.outputs.values())

    @property
    def required_features(self) -> list[str]:
        return self.env.get("requiredSystemFeatures", "").split()

    @property
    def output_paths(self) -> dict[str, str]:
        return {name: o.path for name, o in self.outputs.items()}


def _unescape(value: str) -> str:
    if "\\" not in value:
        return value
    return _ESCAPE_RE.sub(lambda m: _ESCAPES.get(m.group(1), m.group(1)), value)


def _parse_value(tokens: list[tuple[str, str]], pos: int) -> tuple[object, int]:
    kind, value = tokens[pos]
    if kind == "s":
        return value, pos + 1
    if value in "[(":
        close = "]" if value == "[" else ")"
        items: list[object] = []
        pos += 1
        while tokens[pos][1] != close:
            item, pos = _parse_value(tokens, pos)
            items.append(item)
            if tokens[pos][1] == ",":
                pos += 1
        return items, pos + 1
    raise DerivationParseError(f"unexpected token {value!r}")


def parse_derivation(text: str) -> Derivation:
    tokens: list[tuple[str, str]] = []
    for match in _TOKEN.finditer(text):
        if match.group(1) is not None:
            tokens.append(("s", _unescape(match.group(1))))
        elif match.group(2) is not None:
            tokens.append(("p", match.group(2)))
    if not text.startswith("Derive("):
        raise DerivationParseError("not a derivation (missing Derive)")
    try:
        parsed, _ = _parse_value(tokens, 0)
    except (IndexError, RecursionError, DerivationParseError) as exc:
        raise DerivationParseError(f"malformed derivation: {exc}") from None
    if not isinstance(parsed, list) or len(parsed) != 7:
        raise DerivationParseError("malformed derivation: expected 7 fields")
    outputs_raw, inputs_raw, srcs, system, builder, args, env_raw = parsed
    try:
        return Derivation(
            outputs={str(o[0]): DerivationOutput(str(o[1]), str(o[2]), str(o[3]))
                     for o in outputs_raw},
            input_drvs={str(i[0]): [str(x) for x in i[1]]
                        for i in inputs_raw},
            input_srcs=[str(s) for s in srcs],
            system=str(system),
            builder=str(builder),
            args=[str(a) for a in args],
            env={str(e[0]): str(e[1]) for e in env_raw},
        )
    except (TypeError, IndexError) as exc:
        raise DerivationParseError(f"malformed derivation: {exc}") from None


def read_derivation(drv_path: str | Path) -> Derivation:
    return parse_derivation(Path(drv_path).read_text())
