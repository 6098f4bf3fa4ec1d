"""The build page's live log: server-sent events that resume where they stopped."""

from __future__ import annotations

import json

from circus.common.enums import BuildStatus, StepState
from tests.dashboard.conftest import Browser
from tests.dashboard.factories import Rows, World


def events(raw: str) -> list[dict[str, str]]:
    """Parse an SSE body into events ({"event", "data", "id", "retry"})."""
    parsed = []
    for block in raw.split("\n\n"):
        event: dict[str, str] = {}
        for line in block.splitlines():
            if line.startswith(":"):
                continue
            key, _, value = line.partition(": ")
            event[key] = event[key] + "\n" + value if key == "data" and key in event else value
        if event:
            parsed.append(event)
    return parsed


def test_stream_sends_lines_from_an_offset_then_the_outcome(as_viewer: Browser, world: World,
                                                            rows: Rows) -> None:
    build = rows.build(world.evaluation, "streamed", BuildStatus.running)
    # the worker wrote a plain log, then finished the step and compressed the log
    step = rows.step(build, state=StepState.done, status=BuildStatus.succeeded,
                     log="one\ntwo\nthree\n", compressed=True)
    rows.db.commit()
    response = as_viewer.get(f"/build/{build.id}/log/stream?step={step.id}&offset=4")
    assert response.mimetype == "text/event-stream"
    assert response.headers["Cache-Control"] == "no-store"
    got = events(response.get_data(as_text=True))
    assert got[0]["event"] == "step"
    assert json.loads(got[0]["data"]) == {"step": step.id, "offset": 4}
    lines = [e for e in got if "event" not in e]
    assert "\n".join(e["data"] for e in lines) == "two\nthree"
    assert lines[-1]["id"] == f"{step.id}:14"
    assert json.loads(got[-1]["data"]) == {"step": "succeeded", "build": "running",
                                           "build_finished": False}
    # a browser that lost the connection resumes from its Last-Event-ID
    resumed = as_viewer.get(f"/build/{build.id}/log/stream",
                            headers={"Last-Event-ID": f"{step.id}:8"})
    data = [e["data"] for e in events(resumed.get_data(as_text=True)) if "event" not in e]
    assert data == ["three"]


def test_stream_without_a_running_step(as_viewer: Browser, world: World) -> None:
    idle = events(as_viewer.get(f"/build/{world.queued.id}/log/stream").get_data(as_text=True))
    assert idle[0]["event"] == "idle"
    assert idle[0]["retry"] == "2000"
    done = events(as_viewer.get(f"/build/{world.failed.id}/log/stream").get_data(as_text=True))
    assert done[0]["event"] == "end"
    assert json.loads(done[0]["data"])["build_finished"] is True


def test_stream_and_log_reject_foreign_steps(as_viewer: Browser, world: World) -> None:
    other = world.running_step.id
    assert as_viewer.get(f"/build/{world.failed.id}/log/stream?step={other}").status_code == 404
    assert as_viewer.get(f"/build/{world.failed.id}/log?step={other}").status_code == 404
    garbage = as_viewer.get(f"/build/{world.failed.id}/log/stream",
                            headers={"Last-Event-ID": "x:y"})
    assert garbage.status_code == 200


def test_running_build_page_offers_the_stream_from_where_the_page_stops(
        as_viewer: Browser, world: World) -> None:
    page = as_viewer.get(f"/build/{world.running.id}").get_data(as_text=True)
    assert f'data-stream="/build/{world.running.id}/log/stream"' in page
    assert f'data-step="{world.running_step.id}" data-offset="12"' in page
    assert "step 1 of 3" in page
    finished = as_viewer.get(f"/build/{world.failed.id}").get_data(as_text=True)
    assert "data-stream" not in finished


def test_a_running_step_is_followed_before_its_log_path_is_recorded(
        as_viewer: Browser, world: World, rows: Rows) -> None:
    """The queue runner names a step's log in the database when the step finishes;
    while it runs, the log is at the queue runner's conventional path."""
    from pathlib import Path

    build = rows.build(world.evaluation, "young", BuildStatus.running)
    step = rows.step(build, state=StepState.running)
    rows.db.commit()
    base = Path(step.drv_path).name
    path = rows.log_dir / base[:2] / f"{base}-{step.id}.log"
    path.parent.mkdir(parents=True)
    path.write_text("compiling\nlinking\n")
    page = as_viewer.get(f"/build/{build.id}").get_data(as_text=True)
    assert "compiling\nlinking" in page
    assert f'data-step="{step.id}" data-offset="18"' in page
    assert as_viewer.get(f"/build/{build.id}/log").get_data(as_text=True) == "compiling\nlinking\n"
    # the API's log endpoint finds it the same way
    from circus.auth import service
    from circus.common.enums import Role
    from tests.dashboard.factories import SYSTEM

    _, secret = service.create_api_key(rows.db, SYSTEM, name="reader", role=Role.read_only)
    rows.db.commit()
    api = as_viewer.client.get(f"/api/v1/builds/{build.id}/log",
                               headers={"Authorization": f"Bearer {secret}"})
    assert api.status_code == 200
    assert api.get_data(as_text=True) == "compiling\nlinking\n"
