"""Log lines carry the ids of the request or task they were written for."""

from __future__ import annotations

import json
import logging
import threading

from circus.common import logcontext
from circus.common.celery import task_ids
from circus.common.logging import JsonFormatter


def _render(message: str) -> dict[str, object]:
    record = logging.LogRecord("circus.test", logging.INFO, __file__, 1, message, None, None)
    logcontext.ContextFilter().filter(record)
    return dict(json.loads(JsonFormatter().format(record)))


def test_ids_are_carried_within_the_block_and_nested_blocks_add_to_them() -> None:
    assert "request_id" not in _render("outside")
    with logcontext.bound(request_id="r-1"):
        with logcontext.bound(build_id=7, step_id=None):
            inner = _render("inner")
        outer = _render("outer")
    assert inner["request_id"] == "r-1"
    assert inner["build_id"] == 7
    assert "step_id" not in inner
    assert outer == {**outer, "request_id": "r-1"}
    assert "build_id" not in outer
    assert "request_id" not in _render("after")


def test_threads_do_not_see_each_others_ids() -> None:
    seen: dict[str, object] = {}

    def other() -> None:
        seen.update(_render("other thread"))

    with logcontext.bound(evaluation_id=3):
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
    assert "evaluation_id" not in seen


def test_a_client_request_id_is_kept_only_when_it_is_safe_to_log() -> None:
    assert logcontext.request_id_from("ci-run-42") == "ci-run-42"
    for hostile in ("two\nlines", "x" * 65, "quote\"d", "", None):
        made = logcontext.request_id_from(hostile)
        assert made != hostile
        assert len(made) == 32
        assert int(made, 16) >= 0


def test_task_arguments_name_their_ids() -> None:
    def evaluate(evaluation_id: int, *, retry: bool = False) -> None:
        pass

    def finish(step_id: int, build_id: int, note: str) -> None:
        pass

    assert task_ids(evaluate, (42,), {}) == {"evaluation_id": 42}
    assert task_ids(finish, (5,), {"build_id": 9, "note": "x"}) == {"step_id": 5, "build_id": 9}
    assert task_ids(finish, ("not-an-id", 1, 2, 3), {}) == {}
