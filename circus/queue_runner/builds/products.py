"""What a finished build left in ``$out/nix-support``: products, metrics, the failed marker.

Formats (Hydra's): ``hydra-build-products`` has lines ``type subtype path [default]``
(the path may be double-quoted), ``hydra-metrics`` has ``name value [unit]``.
Products are recorded only when they resolve inside one of the build's own
outputs, so a malicious builder cannot make the download endpoint serve
``/etc/shadow`` through a product line or a symlink.
"""

from __future__ import annotations

import hashlib
import logging
import math
import mimetypes
import os
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]*$")
_WORD = re.compile(r"^[A-Za-z0-9_\-]+$")
MAX_LINES = 10_000


@dataclass(frozen=True)
class Product:
    type: str
    subtype: str
    name: str
    path: str
    default_path: str | None
    sha256: str | None
    file_size: int | None
    content_type: str | None
    is_directory: bool


@dataclass(frozen=True)
class Metric:
    name: str
    value: float
    unit: str | None


@dataclass
class OutputResult:
    """Everything read from a derivation's outputs after it was built."""

    failed_marker: bool = False
    products: list[Product] = field(default_factory=list)
    metrics: list[Metric] = field(default_factory=list)


def _inside(path: str, roots: list[str]) -> bool:
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def parse_products(text: str, outputs: list[str]) -> list[Product]:
    products: list[Product] = []
    for line in text.splitlines()[:MAX_LINES]:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            words = shlex.split(line)
        except ValueError:
            log.warning("unparsable hydra-build-products line %r", line)
            continue
        if len(words) < 3 or not _WORD.match(words[0]) or not _WORD.match(words[1]):
            log.warning("ignoring hydra-build-products line %r", line)
            continue
        kind, subtype, path = words[0], words[1], os.path.normpath(words[2])
        default = words[3] if len(words) > 3 else None
        real = os.path.realpath(path)
        if not _inside(path, outputs) or not _inside(real, outputs) or not os.path.exists(real):
            log.warning("product %s is not inside the build's outputs; ignored", path)
            continue
        is_dir = os.path.isdir(real)
        size = None if is_dir else os.path.getsize(real)
        sha = None if is_dir else _sha256(real)
        content_type = None if is_dir else (mimetypes.guess_type(real)[0]
                                            or "application/octet-stream")
        name = "" if path in outputs else os.path.basename(path)
        products.append(Product(kind, subtype, name, path, default, sha, size, content_type,
                                is_dir))
    return products


def parse_metrics(text: str) -> list[Metric]:
    metrics: dict[str, Metric] = {}
    for line in text.splitlines()[:MAX_LINES]:
        words = line.split()
        if len(words) < 2 or not _NAME.match(words[0]):
            continue
        try:
            value = float(words[1])
        except ValueError:
            continue
        if not math.isfinite(value):
            continue
        metrics[words[0]] = Metric(words[0], value, words[2] if len(words) > 2 else None)
    return list(metrics.values())


def read_output_result(outputs: Mapping[str, str]) -> OutputResult:
    """Products, metrics and the failed marker of built outputs (missing files are fine)."""
    paths = list(outputs.values())
    result = OutputResult()
    for path in paths:
        support = Path(path, "nix-support")
        if not support.is_dir():
            continue
        if (support / "failed").exists():
            result.failed_marker = True
        products = support / "hydra-build-products"
        if products.is_file():
            result.products.extend(parse_products(products.read_text(errors="replace"), paths))
        metrics = support / "hydra-metrics"
        if metrics.is_file():
            result.metrics.extend(parse_metrics(metrics.read_text(errors="replace")))
    return result
