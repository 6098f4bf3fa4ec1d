"""Hydra-compatible channel endpoints and job badges (no credentials needed)."""

from __future__ import annotations

import io
import json
import lzma
import subprocess
import tarfile
from pathlib import Path

from flask.testing import FlaskClient
from sqlalchemy.orm import Session

from circus.common.enums import BuildStatus
from circus.common.models import Channel
from tests.api.conftest import World


def test_channel_endpoints(client: FlaskClient, world: World, db: Session, tmp_path: Path,
                           nix_env: dict[str, str]) -> None:
    project = world.project()
    jobset = world.jobset(project)
    evaluation = world.evaluation(jobset, commit_hash="c0ffee" * 6 + "abcd")
    world.build(evaluation, "hello", BuildStatus.succeeded, outputs={"out": "/nix/store/aaa-hello"},
                nix_name="hello-1.0")
    world.build(evaluation, "broken", BuildStatus.failed, outputs={"out": "/nix/store/bbb-broken"})
    db.add(Channel(project_id=project.id, jobset_id=jobset.id, name="stable",
                   evaluation_id=evaluation.id))
    db.add(Channel(project_id=project.id, jobset_id=jobset.id, name="empty"))
    db.commit()

    assert client.get("/channel/stable/git-revision").data == b"c0ffee" * 6 + b"abcd"
    assert client.get("/channel/stable/binary-cache-url").data == b"http://localhost/nix-cache"
    paths = lzma.decompress(client.get("/channel/stable/store-paths.xz").data).decode()
    assert paths == "/nix/store/aaa-hello\n"
    data = client.get("/channel/stable/nixexprs.tar.xz").data
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        member = archive.extractfile("stable/default.nix")
        assert member is not None
        expression = member.read().decode()
    assert '"hello" = {' in expression
    assert "broken" not in expression
    # the generated expression is valid Nix describing the job's output
    (tmp_path / "default.nix").write_text(expression)
    out = subprocess.run(["nix-instantiate", "--eval", "--strict", "--json", "-E",
                          f"(import {tmp_path}/default.nix {{}}).hello.outPath"],
                         env=nix_env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == '"/nix/store/aaa-hello"'

    assert client.get("/channel/empty/git-revision").status_code == 404
    assert client.get("/channel/nope/store-paths.xz").status_code == 404


def test_badges(client: FlaskClient, world: World) -> None:
    jobset = world.jobset(world.project())
    evaluation = world.evaluation(jobset)
    good = world.build(evaluation, "good", BuildStatus.succeeded)
    world.build(evaluation, "bad", BuildStatus.failed)
    world.build(evaluation, "new")

    badge = client.get("/job/proj/main/good/badge")
    assert badge.mimetype == "image/svg+xml"
    assert b"passing" in badge.data
    assert b"failing" in client.get("/job/proj/main/bad/badge").data
    assert b"pending" in client.get("/job/proj/main/new/badge").data
    assert b"unknown" in client.get("/job/proj/main/ghost/badge").data
    shield = client.get("/job/proj/main/bad/shield").get_json()
    assert shield == {"schemaVersion": 1, "label": "build", "message": "failing",
                      "color": "red"}
    latest = client.get("/job/proj/main/good/latest")
    assert latest.status_code == 302
    assert latest.headers["Location"] == f"/api/v1/builds/{good.id}"
    assert client.get("/job/proj/main/bad/latest").status_code == 404


def test_channel_nested_jobs_are_installable_with_nix_env(
        client: FlaskClient, world: World, db: Session, tmp_path: Path,
        nix_env: dict[str, str]) -> None:
    project = world.project()
    jobset = world.jobset(project)
    evaluation = world.evaluation(jobset)
    for job, path in (("hello", "hello"), ("packageset.nested", "nested"),
                      ("packageset.deeper.leaf", "leaf"),
                      ('packageset."dotted.name"', "dotted")):
        world.build(evaluation, job, BuildStatus.succeeded, nix_name=f"{path}-1.0",
                    outputs={"out": f"/nix/store/{path[0] * 32}-{path}"})
    db.add(Channel(project_id=project.id, jobset_id=jobset.id, name="nested",
                   evaluation_id=evaluation.id))
    db.commit()

    data = client.get("/channel/nested/nixexprs.tar.xz").data
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        archive.extractall(tmp_path, filter="data")
    expression = (tmp_path / "nested" / "default.nix").read_text()
    assert '"packageset.nested"' not in expression  # nested sets, not dotted names
    out = subprocess.run(["nix-env", "-qaP", "--json", "--out-path", "-f",
                          str(tmp_path / "nested")],
                         env=nix_env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    listed = json.loads(out.stdout)
    assert {attr: item["name"] for attr, item in listed.items()} == {
        "hello": "hello-1.0",
        "packageset.nested": "nested-1.0",
        "packageset.deeper.leaf": "leaf-1.0",
    }
    assert listed["packageset.nested"]["outputs"] == {"out": f"/nix/store/{'n' * 32}-nested"}
    # nix-env skips names that are not plain identifiers; the job is still in the set
    out = subprocess.run(["nix-instantiate", "--eval", "--strict", "--json", "-E",
                          f'(import {tmp_path}/nested {{}}).packageset."dotted.name".outPath'],
                         env=nix_env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f'"/nix/store/{"d" * 32}-dotted"'
