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
    assert client.get("/job/proj/main/good/latest", headers={"Accept": "*/*"}
                      ).headers["Location"] == f"/api/v1/builds/{good.id}"
    # a browser following the job page's link lands on the build page, not on JSON
    browser = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}
    assert client.get("/job/proj/main/good/latest", headers=browser
                      ).headers["Location"] == f"/build/{good.id}"
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


def _multi_output(name: str, nix_env: dict[str, str]) -> tuple[str, dict[str, str]]:
    """A real derivation with outputs out, bin and dev, built: (drv path, outputs)."""
    expr = (f'derivation {{ name = "{name}"; system = builtins.currentSystem; '
            'builder = "/bin/sh"; outputs = [ "out" "bin" "dev" ]; '
            'args = [ "-c" "echo out > $out; echo bin > $bin; echo dev > $dev" ]; }')
    drv = subprocess.run(["nix-instantiate", "-E", expr], env=nix_env, check=True,
                         capture_output=True, text=True).stdout.strip()
    paths = subprocess.run(["nix-store", "--realise", drv], env=nix_env, check=True,
                           capture_output=True, text=True).stdout.split()
    return drv, {path.rsplit("-", 1)[1] if path.endswith(("-bin", "-dev")) else "out": path
                 for path in paths}


def test_channels_keep_outputs_to_install_for_nix_env(
        client: FlaskClient, world: World, db: Session, tmp_path: Path,
        nix_env: dict[str, str], nonce: str) -> None:
    """``meta.outputsToInstall`` reaches the channel: ``nix-env -i`` installs those
    outputs (not dev); a job without it gets Nix's default, every output."""
    project = world.project()
    jobset = world.jobset(project)
    evaluation = world.evaluation(jobset)
    installed: dict[str, dict[str, str]] = {}
    for job, chosen in (("tools", ["bin", "out"]), ("plain", None)):
        drv, outputs = _multi_output(f"{job}-{nonce}-1.0", nix_env)
        build = world.build(evaluation, job, BuildStatus.succeeded, nix_name=f"{job}-1.0",
                            outputs=outputs, outputs_to_install=chosen)
        build.drv_path = drv
        installed[job] = outputs
    db.add(Channel(project_id=project.id, jobset_id=jobset.id, name="outputs",
                   evaluation_id=evaluation.id))
    db.commit()

    data = client.get("/channel/outputs/nixexprs.tar.xz").data
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        archive.extractall(tmp_path, filter="data")
    channel = str(tmp_path / "outputs")
    listed = json.loads(subprocess.run(["nix-env", "-qaP", "--json", "--meta", "-f", channel],
                                       env=nix_env, check=True, capture_output=True,
                                       text=True).stdout)
    assert listed["tools"]["meta"]["outputsToInstall"] == ["bin", "out"]
    assert "outputsToInstall" not in listed["plain"]["meta"]

    profile = str(tmp_path / "profile")
    for job in ("tools", "plain"):
        done = subprocess.run(["nix-env", "-p", profile, "-f", channel, "-iA", job],
                              env=nix_env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    got = json.loads(subprocess.run(["nix-env", "-p", profile, "-q", "--json", "--out-path"],
                                    env=nix_env, check=True, capture_output=True,
                                    text=True).stdout)
    by_name = {item["pname"]: item["outputs"] for item in got.values()}
    assert by_name["tools"] == {o: installed["tools"][o] for o in ("bin", "out")}
    assert by_name["plain"] == installed["plain"]
