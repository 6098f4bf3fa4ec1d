"""The channels page: mode and aggregate job set through the same service function
as the API (tests/api/test_channel_modes.py), refused input shown in the form."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from circus.common.enums import ChannelMode
from circus.common.models import AuditLog, Channel
from tests.dashboard.conftest import Browser
from tests.dashboard.factories import World


def _channel(db: Session) -> Channel:
    db.expire_all()
    return db.scalars(select(Channel).where(Channel.name == "demo-unstable")).one()


def test_an_admin_switches_a_channel_to_automatic(as_admin: Browser, world: World,
                                                 db: Session) -> None:
    page = as_admin.get("/channels").get_data(as_text=True)
    assert "manual (promote)" in page
    assert "Save channel" in page
    response = as_admin.post("/channels/demo-unstable/settings",
                             {"mode": "automatic", "aggregate_job": "tests"}, page="/channels")
    assert response.status_code == 302
    row = _channel(db)
    assert (row.mode, row.aggregate_job) == (ChannelMode.automatic, "tests")
    assert db.scalar(select(AuditLog.action).where(
        AuditLog.target == "channel:demo-unstable", AuditLog.action == "channel.update"))
    page = as_admin.get("/channels").get_data(as_text=True)
    assert "newest evaluation whose job <code>tests</code> succeeded" in page

    refused = as_admin.post("/channels/demo-unstable/settings",
                            {"mode": "automatic", "aggregate_job": "two words"},
                            page="/channels")
    assert refused.status_code == 400
    assert "no whitespace" in refused.get_data(as_text=True)
    refused = as_admin.post("/channels/demo-unstable/settings", {"mode": "sometimes"},
                            page="/channels")
    assert refused.status_code == 400
    assert "one of manual, automatic" in refused.get_data(as_text=True)
    assert _channel(db).aggregate_job == "tests"


def test_a_viewer_gets_no_form_and_cannot_post(as_viewer: Browser, world: World,
                                               db: Session) -> None:
    assert "Save channel" not in as_viewer.get("/channels").get_data(as_text=True)
    response = as_viewer.client.post("/channels/demo-unstable/settings",
                                     data={"mode": "automatic",
                                           "csrf_token": as_viewer.token("/settings")})
    assert response.status_code in (403, 404)
    assert _channel(db).mode is ChannelMode.manual
