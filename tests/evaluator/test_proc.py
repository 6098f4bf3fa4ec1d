"""circus.evaluator.proc: the program's output reaches the handlers line by line, as
a text stream would give it, however the program writes it."""

from __future__ import annotations

import sys

import pytest

from circus.evaluator import proc

# writes in pieces that split lines (and a UTF-8 sequence) across reads, with pauses
# so the reader sees them separately; CRLF and CR endings; a byte that is not UTF-8;
# a last line without its newline, longer than a read
WRITER = r"""
import os, sys, time
out = sys.stdout.fileno()
for piece in [b"first li", b"ne\nsecond\r\nthi", b"rd\rcaf\xc3", b"\xa9\nbad \xff byte\n"]:
    os.write(out, piece)
    time.sleep(0.05)
os.write(out, b"x" * (3 << 20))
os.write(2, b"on stderr\n")
"""


def test_lines_are_split_and_decoded_as_a_text_stream_would() -> None:
    seen: dict[str, list[str]] = {"out": [], "err": []}

    def on_stdout(line: str) -> bool:
        seen["out"].append(line)
        return len(line) < 100

    def on_stderr(line: str) -> bool:
        seen["err"].append(line)
        return True

    finished = proc.stream([sys.executable, "-c", WRITER], on_stdout=on_stdout,
                           on_stderr=on_stderr)
    assert finished.returncode == 0
    assert seen["out"] == ["first line", "second", "third", "café", "bad \ufffd byte",
                           "x" * (3 << 20)]
    assert seen["err"] == ["on stderr"]
    # the tail keeps the lines the handler kept
    assert finished.stdout_tail == "first line\nsecond\nthird\ncafé\nbad \ufffd byte"
    assert finished.stderr_tail == "on stderr"


def test_a_failing_handler_is_reported_and_the_program_still_finishes() -> None:
    def on_stdout(line: str) -> bool:
        raise ValueError(f"cannot read {line!r}")

    # more than a pipe holds: the reader drains it after the error, or this never ends
    writer = "import sys; sys.stdout.write('a\\n' * 200000)"
    with pytest.raises(ValueError, match="cannot read 'a'"):
        proc.stream([sys.executable, "-c", writer], on_stdout=on_stdout)
