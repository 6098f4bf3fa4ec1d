"""Odd input is a clear 4xx, never a 500."""

from __future__ import annotations

from flask.testing import FlaskClient

from tests.api.conftest import World


def test_malformed_requests_are_4xx(client: FlaskClient, admin: dict[str, str],
                                    world: World) -> None:
    world.project("demo")
    world.db.commit()
    json_headers = {**admin, "Content-Type": "application/json"}
    cases = [
        client.post("/api/v1/projects", headers=json_headers, data="{not json"),
        client.post("/api/v1/projects", headers=admin, json=["a", "list"]),
        client.post("/api/v1/projects", headers=admin, json={"name": "a\x00b"}),
        client.post("/api/v1/projects", headers=admin, json={"name": "x" * 500}),
        client.post("/api/v1/projects", headers=admin, json={"name": None}),
        client.get("/api/v1/builds?project_id=99999999999999999999999", headers=admin),
        client.get("/api/v1/builds?status=7", headers=admin),
        client.get("/api/v1/search?q=%00", headers=admin),
        client.get("/api/v1/projects/demo%00x", headers=admin),
        client.get("/api/v1/admin/builders/sessions/a%00b", headers=admin),
        client.get("/channel/a%00b/git-revision"),
        client.put("/api/v1/projects/demo", headers=admin, json={"owner_id": 2**62}),
        client.post("/api/v1/evaluations/trigger", headers=admin, json={}),
        client.delete("/api/v1/projects", headers=admin),
    ]
    statuses = [response.status_code for response in cases]
    assert [s for s in statuses if not 400 <= s < 500] == [], str(statuses)
    for response in cases:
        if response.mimetype == "application/json":
            assert set(response.get_json()) == {"error", "details"}
    assert statuses[-1] == 405
    badge = client.get("/job/demo/main/a%00b/badge")
    assert b"unknown" in badge.data
    assert "Allow" in cases[-1].headers
