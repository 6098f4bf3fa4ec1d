"""Channel modes over the API, declaratively and on the channels page: manual
channels move only by promote, automatic ones follow the newest good evaluation
(every build succeeded, or only ``aggregate_job``). The end-to-end run on real
Nix builds is tests/evaluator/test_channels_follow.py."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from circus.common.config import ConfigError, Settings
from circus.common.enums import BuildStatus, ChannelMode, EvaluationStatus
from circus.common.models import AuditLog, Channel
from circus.declarative import apply_declarative
from tests.api.conftest import World


def _history(world: World) -> tuple[int, int, int, int]:
    """A jobset with a good evaluation, a newer one whose aggregate succeeded but
    another job failed, a newer one still building and a running one; returns the
    jobset's id and the first three evaluations' ids."""
    jobset = world.jobset(world.project("demo"))
    good = world.evaluation(jobset, commit_hash="a" * 40)
    world.build(good, "hello", BuildStatus.succeeded, outputs={"out": "/nix/store/aaa-hello"})
    world.build(good, "release", BuildStatus.succeeded, is_aggregate=True)
    gated = world.evaluation(jobset, commit_hash="b" * 40)
    world.build(gated, "hello", BuildStatus.failed)
    world.build(gated, "release", BuildStatus.succeeded, is_aggregate=True)
    building = world.evaluation(jobset, commit_hash="c" * 40)
    world.build(building, "hello", BuildStatus.pending)
    world.build(building, "release", BuildStatus.succeeded, is_aggregate=True)
    running = world.evaluation(jobset, status=EvaluationStatus.running)
    world.build(running, "hello", BuildStatus.succeeded)
    world.db.commit()
    return jobset.id, good.id, gated.id, building.id


def test_create_and_switch_modes_over_the_api(client: FlaskClient, admin: dict[str, str],
                                              world: World, db: Session) -> None:
    jobset_id, good, gated, building = _history(world)

    manual = client.post("/api/v1/channels", headers=admin,
                         json={"name": "pinned", "jobset_id": jobset_id})
    assert manual.status_code == 201
    assert manual.get_json()["mode"] == "manual"
    assert manual.get_json()["evaluation_id"] is None  # manual: only promote moves it

    auto = client.post("/api/v1/channels", headers=admin, json={
        "name": "follow", "jobset_id": jobset_id, "mode": "automatic"})
    assert auto.status_code == 201
    # an automatic channel catches up at once: the newest evaluation with all builds good
    assert auto.get_json()["evaluation_id"] == good
    assert auto.get_json()["moved_at"] is not None
    release = client.post("/api/v1/channels", headers=admin, json={
        "name": "release", "jobset_id": jobset_id, "mode": "automatic",
        "aggregate_job": "release"})
    assert release.status_code == 201
    # only the aggregate must succeed; the still-building evaluation's aggregate did,
    # the running evaluation is not completed
    assert release.get_json()["evaluation_id"] == building
    assert client.get("/channel/release/git-revision").data == b"c" * 40
    assert client.get("/channel/follow/git-revision").data == b"a" * 40

    # switching the manual channel to automatic moves it (and is audited)
    switched = client.put("/api/v1/channels/pinned", headers=admin, json={"mode": "automatic"})
    assert switched.status_code == 200, switched.get_json()
    assert switched.get_json()["evaluation_id"] == good
    switched = client.put("/api/v1/channels/pinned", headers=admin,
                          json={"aggregate_job": "release"})
    assert switched.get_json()["evaluation_id"] == building
    assert switched.get_json()["aggregate_job"] == "release"
    # back to manual: stays where it is; clearing the job keeps it too (never backwards)
    back = client.put("/api/v1/channels/pinned", headers=admin,
                      json={"mode": "manual", "aggregate_job": None})
    assert (back.get_json()["mode"], back.get_json()["aggregate_job"],
            back.get_json()["evaluation_id"]) == ("manual", None, building)
    back = client.put("/api/v1/channels/pinned", headers=admin, json={"mode": "automatic"})
    assert back.get_json()["evaluation_id"] == building
    follow = client.get("/api/v1/channels/follow", headers=admin).get_json()
    assert follow["evaluation_id"] == good != gated  # the failing evaluation is skipped

    db.expire_all()
    actions = db.execute(select(AuditLog.action, AuditLog.actor, AuditLog.target)
                         .where(AuditLog.target == "channel:pinned")
                         .order_by(AuditLog.id)).tuples().all()
    assert [a for a, _, _ in actions] == ["channel.create", "channel.update", "channel.advance",
                                          "channel.update", "channel.advance",
                                          "channel.update", "channel.update"]
    assert {actor for action, actor, _ in actions if action == "channel.advance"} == {
        "channels"}


def test_bad_channel_settings_are_refused_with_json(client: FlaskClient, admin: dict[str, str],
                                                    world: World) -> None:
    jobset_id, _, _, _ = _history(world)
    cases: list[tuple[str, str, dict[str, Any], int, str]] = [
        ("post", "/api/v1/channels", {"name": "x", "jobset_id": jobset_id, "mode": "sometimes"},
         400, "mode"),
        ("post", "/api/v1/channels", {"name": "x", "jobset_id": jobset_id, "mode": "automatic",
                                      "aggregate_job": ""}, 400, "aggregate_job"),
        ("post", "/api/v1/channels", {"name": "x", "jobset_id": jobset_id, "mode": 3},
         400, "mode"),
        # the schema takes any short string; the service refuses whitespace in a job name
        ("post", "/api/v1/channels", {"name": "x", "jobset_id": jobset_id,
                                      "aggregate_job": "two words"}, 400, "aggregate_job"),
    ]
    client.post("/api/v1/channels", headers=admin, json={"name": "ok", "jobset_id": jobset_id})
    cases += [
        ("put", "/api/v1/channels/ok", {"mode": "weekly"}, 400, "mode"),
        ("put", "/api/v1/channels/ok", {"aggregate_job": "a\tb"}, 400, "aggregate_job"),
        ("put", "/api/v1/channels/ok", {"aggregate_job": "j" * 256}, 400, "aggregate_job"),
        ("put", "/api/v1/channels/ok", {"colour": "red"}, 400, "colour"),
    ]
    for method, url, body, status, field in cases:
        response = getattr(client, method)(url, headers=admin, json=body)
        assert response.status_code == status, (body, response.get_json())
        assert response.mimetype == "application/json"
        assert field in str(response.get_json()), (body, response.get_json())
    assert client.put("/api/v1/channels/nope", headers=admin,
                      json={"mode": "automatic"}).status_code == 404
    assert client.put("/api/v1/channels/ok", json={"mode": "automatic"}).status_code in (401, 403)
    # nothing was created or changed by the refused requests
    listed = client.get("/api/v1/channels", headers=admin).get_json()
    assert [(c["name"], c["mode"], c["aggregate_job"]) for c in listed["items"]] == [
        ("ok", "manual", None)]


def test_declarative_channels_take_a_mode(db: Session, world: World,
                                          make_settings: Callable[..., Settings]) -> None:
    declared = {"projects": [{
        "name": "decl", "jobsets": [{"name": "main"}],
        "channels": [{"name": "decl-auto", "jobset": "main", "mode": "automatic",
                      "aggregate_job": "release"},
                     {"name": "decl-manual", "jobset": "main"}]}]}
    summary = apply_declarative(db, make_settings(declarative=declared))
    db.commit()
    assert {"channel:decl-auto", "channel:decl-manual"} <= set(summary["created"])
    rows = {c.name: (c.mode, c.aggregate_job) for c in db.scalars(select(Channel))}
    assert rows == {"decl-auto": (ChannelMode.automatic, "release"),
                    "decl-manual": (ChannelMode.manual, None)}
    declared["projects"][0]["channels"][0]["mode"] = "manual"  # type: ignore[index]
    apply_declarative(db, make_settings(declarative=declared))
    db.commit()
    db.expire_all()
    auto = db.scalars(select(Channel).where(Channel.name == "decl-auto")).one()
    assert auto.mode is ChannelMode.manual


def test_declarative_channel_mode_is_validated(make_settings: Callable[..., Settings]) -> None:
    with pytest.raises(ConfigError) as raised:
        make_settings(declarative={"projects": [{
            "name": "decl", "jobsets": [{"name": "main"}],
            "channels": [{"name": "c", "jobset": "main", "mode": "sometimes",
                          "aggregate_job": ""}]}]})
    text = str(raised.value)
    assert "projects[0].channels[0].mode" in text or "channels.0.mode" in text, text
    assert "aggregate_job" in text, text


def test_channels_page_shows_the_mode(client: FlaskClient, admin: dict[str, str],
                                      world: World) -> None:
    jobset_id, good, _, _ = _history(world)
    client.post("/api/v1/channels", headers=admin, json={
        "name": "follow", "jobset_id": jobset_id, "mode": "automatic",
        "aggregate_job": "release"})
    client.post("/api/v1/channels", headers=admin, json={"name": "pinned",
                                                         "jobset_id": jobset_id})
    page = client.get("/channels", headers=admin)
    assert page.status_code == 200
    body = page.get_data(as_text=True)
    assert "newest evaluation whose job <code>release</code> succeeded" in body
    assert "manual (promote)" in body
    assert f"#{good}" not in body  # "follow" is at the newest evaluation with its job good
