"""The ``nix-store --export`` stream: which store paths it would add, read before importing.

An export is, per path, ``1``, the path's NAR, the magic ``NIXE``, the path,
its references, its deriver and ``0`` (no legacy signature); a final ``0``
ends it. The path's name comes *after* its NAR, so a stream has to be read in
full (from a file it was spooled to) before anyone can say what importing it
would add to the store.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection
from dataclasses import dataclass
from typing import IO

from circus.common.nix import nar, storepath
from circus.common.nix.derivation import DerivationParseError, parse_derivation

EXPORT_MAGIC = 0x4558494E
#: more references than any real path has; a bound for a hostile stream
MAX_REFERENCES = 100_000
#: the largest .drv an upload may hold (its ATerm is read into memory to be checked)
MAX_DERIVATION_SIZE = 64 * 1024 * 1024


class ExportFormatError(ValueError):
    pass


@dataclass(frozen=True)
class ExportedPath:
    path: str
    references: tuple[str, ...]
    deriver: str | None
    #: where the path's NAR starts in the stream (to read its content again)
    nar_offset: int


def read_entries(source: IO[bytes]) -> list[ExportedPath]:
    """Validate the export stream in ``source`` and list the paths it carries (in order).

    Raises :class:`ExportFormatError` for anything ``nix-store --import`` should
    not be shown: a malformed NAR, a name that is not a store path, trailing bytes.
    """
    reader = nar.Reader(source, None, None)
    entries = []
    try:
        while True:
            more = reader.u64()
            if more == 0:
                break
            if more != 1:
                raise ExportFormatError(f"bad export entry marker {more}")
            nar_offset = source.tell()
            nar.read_archive(reader)
            if reader.u64() != EXPORT_MAGIC:
                raise ExportFormatError("missing export magic after a NAR")
            path = _store_path(reader)
            count = reader.u64()
            if count > MAX_REFERENCES:
                raise ExportFormatError(f"{count} references")
            references = tuple(_store_path(reader) for _ in range(count))
            deriver_text = reader.token().decode(errors="replace")
            deriver = _checked(deriver_text) if deriver_text else None
            if reader.u64() != 0:  # a legacy signature: Nix ignores it; so do we
                reader.token()
            entries.append(ExportedPath(path, references, deriver, nar_offset))
    except nar.NarFormatError as exc:
        raise ExportFormatError(str(exc)) from None
    if source.read(1):
        raise ExportFormatError("trailing data after the export")
    return entries


def _store_path(reader: nar.Reader) -> str:
    return _checked(reader.token().decode(errors="replace"))


def _checked(path: str) -> str:
    if not storepath.is_store_path(path):
        raise ExportFormatError(f"{path[:200]!r} is not a store path")
    return path


class ExportRefused(ValueError):
    """An export that must not be imported; the message is the reason to give."""


def verify_export(source: IO[bytes], allowed: Collection[str], owner: str
                  ) -> list[ExportedPath]:
    """The paths of the export spooled in ``source``, each one of ``allowed``.

    Whoever receives outputs from a builder on another host (an agent, a remote
    Celery worker) calls this on the *whole* stream before ``nix-store --import``
    sees a byte of it: a stray path must never reach the store. ``owner`` names
    what the paths belong to in the refusal (``step 12``). Leaves ``source`` at
    its start; raises :class:`ExportRefused`.
    """
    source.seek(0)
    try:
        entries = read_entries(source)
    except ExportFormatError as exc:
        raise ExportRefused(f"refused: the output stream of {owner} is not a valid "
                            f"export: {exc}") from None
    foreign = [e.path for e in entries if e.path not in allowed]
    if foreign:
        raise ExportRefused(f"refused: {foreign[0]} is not an output of {owner}")
    source.seek(0)
    return entries


def verify_derivation_export(source: IO[bytes], owner: str) -> list[ExportedPath]:
    """The paths of an evaluator's upload spooled in ``source``: derivations and the
    sources they name, nothing else.

    An evaluator on another host sends the ``.drv`` closure of its new builds. Every
    path in the stream must be a ``.drv`` (no deriver: it is not a build's output) or
    a source path (no deriver either) that a ``.drv`` in the same stream references,
    i.e. one of its ``inputSrcs``: whatever the closure names. A build output slipped
    in (which would let an uploader pose as a builder) is refused; nothing is
    imported. ``owner`` names the uploader in the refusal. Leaves ``source`` at its
    start; raises :class:`ExportRefused`.
    """
    source.seek(0)
    try:
        entries = read_entries(source)
    except ExportFormatError as exc:
        raise ExportRefused(f"refused: the derivation upload of {owner} is not a valid "
                            f"export: {exc}") from None
    named = {ref for e in entries if e.path.endswith(".drv") for ref in e.references}
    for entry in entries:
        if entry.deriver is not None:
            raise ExportRefused(f"refused: {entry.path} is the output of {entry.deriver}, "
                                "not a derivation or a source")
        if not entry.path.endswith(".drv") and entry.path not in named:
            raise ExportRefused(f"refused: {entry.path} is neither a derivation nor a "
                                "source one of the uploaded derivations names")
    for entry in entries:
        problem = content_mismatch(source, entry)
        if problem is not None:
            raise ExportRefused(f"refused: {entry.path} {problem}")
    source.seek(0)
    return entries


def content_mismatch(source: IO[bytes], entry: ExportedPath) -> str | None:
    """Why ``entry`` (read from ``source`` by :func:`read_entries`) is not the
    content-addressed path Nix would give its content and references; None if it is.

    A ``.drv`` is a text path: ``makeTextPath`` of its ATerm, whose references are
    exactly its input derivations and input sources. A source is whichever of the
    other ways Nix adds a file fits (NAR SHA-256 ``source:``, ``builtins.toFile``
    text, flat SHA-256): a path anyone could have named differently (a forged .drv
    posing under a legitimate derivation's path, a reference set the content does not
    name) is not its content's address. Leaves ``source`` anywhere.
    """
    is_derivation = entry.path.endswith(".drv")
    file_digest = hashlib.sha256()
    contents = bytearray()

    def take(chunk: bytes) -> None:
        file_digest.update(chunk)
        if is_derivation:
            if len(contents) + len(chunk) > MAX_DERIVATION_SIZE:
                raise ExportRefused(f"refused: {entry.path} is larger than "
                                    f"{MAX_DERIVATION_SIZE} bytes")
            contents.extend(chunk)

    source.seek(entry.nar_offset)
    reader = nar.Reader(source, None, None)
    try:
        kind = nar.read_archive(reader, file_sink=take)
    except nar.NarFormatError as exc:  # it was read once already: the file changed
        return f"cannot be read again: {exc}"
    name = storepath.name_of(entry.path)
    references = set(entry.references)
    if len(references) != len(entry.references):
        return "lists a reference twice"
    if is_derivation:
        if kind != nar.REGULAR:
            return f"is not a plain file (a {kind}), so not a derivation"
        try:
            drv = parse_derivation(contents.decode())
        except (UnicodeDecodeError, DerivationParseError) as exc:
            return f"is not a valid derivation: {exc}"
        inputs = set(drv.input_drvs) | set(drv.input_srcs)
        if references != inputs:
            # the first of each difference: a hostile list may be long
            extra, lacking = sorted(references - inputs)[:1], sorted(inputs - references)[:1]
            return (f"declares the references {sorted(references)[:20]} but its inputs "
                    f"are not those (declared, not an input: {extra}; an input, not "
                    f"declared: {lacking})")
        if storepath.make_text_path(name, file_digest.digest(), inputs) != entry.path:
            return "is not the store path of its contents"
        return None
    if entry.path in references:
        return "references itself, which no source does"
    if storepath.make_source_path(name, reader.digest.digest(), references) == entry.path:
        return None
    if kind == nar.REGULAR and entry.path == storepath.make_text_path(
            name, file_digest.digest(), references):
        return None
    if kind in (nar.REGULAR, nar.EXECUTABLE) and not references and \
            entry.path == storepath.make_flat_path(name, file_digest.digest()):
        return None
    return ("is not the store path of its contents (neither a source added by its NAR "
            "hash, nor a text file, nor a file added by its SHA-256)")
