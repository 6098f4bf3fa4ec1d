"""GC roots for the newest keep_nr evaluations and kept builds; closure sizes."""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from circus.common.nix.base32 import encode as nix_base32
from circus.queue_runner.builds.gcroots import existing_roots, sync_roots
from circus.queue_runner.builds.postprocess import PostProcessor
from circus.queue_runner.service import set_keep
from tests.queue_runner.conftest import Driver
from tests.queue_runner.factories import instantiate, make_builds, make_jobset


def test_nix_base32_matches_nix(nix_env: dict[str, str]) -> None:
    for data in (b"", b"circus", b"/tmp/some/link"):
        digest = hashlib.sha1(data, usedforsecurity=False).hexdigest()
        expected = subprocess.run(["nix-hash", "--type", "sha1", "--to-base32", digest],
                                  capture_output=True, text=True, env=nix_env,
                                  check=True).stdout.strip()
        assert nix_base32(bytes.fromhex(digest)) == expected


def test_roots_follow_keep_nr_and_keep(driver: Callable[..., Driver],
                                       committed_db: sessionmaker[Session],
                                       nix_env: dict[str, str], nonce: str) -> None:
    run = driver()
    old = instantiate(["base", "left"], nonce + "old", nix_env)
    new = instantiate(["base"], nonce + "new", nix_env)
    with committed_db() as session:
        jobset = make_jobset(session, "gc", keep_nr=1)
        first = make_builds(session, old, jobset=jobset)
        second = make_builds(session, new, jobset=jobset)
    ids = [b.id for b in [*first.values(), *second.values()]]
    run.run(ids)
    settings = run.settings
    outputs = {job: Path(subprocess.run(["nix-store", "-q", "--outputs", drv],
                                        capture_output=True, text=True, env=nix_env,
                                        check=True).stdout.strip())
               for job, drv in [("old-left", old["left"]), ("new-base", new["base"])]}

    post = PostProcessor(settings, committed_db)
    post.process({b.id: [str(outputs["new-base"])] for b in second.values()})
    with committed_db() as session:
        size = session.execute(text("SELECT closure_size FROM builds WHERE id = :id"),
                               {"id": second["base"].id}).scalar_one()
        assert size is not None
        assert size > 0
        set_keep(session, first["left"].id, True)
        session.commit()
        sync_roots(session, settings)
        session.commit()
    roots = existing_roots(settings)
    # only the newest evaluation (keep_nr = 1) and the kept build are rooted
    assert set(roots) == {str(outputs["new-base"]), str(outputs["old-left"])}
    for path, link in roots.items():
        assert os.readlink(link) == path
    listed = subprocess.run(["nix-store", "--gc", "--print-roots"], capture_output=True,
                            text=True, env=nix_env, check=True).stdout
    assert str(roots[str(outputs["old-left"])]) in listed  # Nix sees the indirect root

    with committed_db() as session:
        set_keep(session, first["left"].id, False)
        session.commit()
        report = sync_roots(session, settings)
        session.commit()
    assert report.removed == 1
    assert set(existing_roots(settings)) == {str(outputs["new-base"])}


def test_max_age_days_releases_old_evaluations_but_never_the_newest(
        committed_db: sessionmaker[Session], nix_env: dict[str, str], nonce: str) -> None:
    from circus.common.enums import BuildStatus
    from circus.queue_runner.builds.gcroots import wanted_roots

    with committed_db() as session:
        jobset = make_jobset(session, "aged", keep_nr=3)
        evaluations = [make_builds(session, instantiate(["base"], f"{nonce}{n}", nix_env),
                                   jobset=jobset, notify=False,
                                   status=BuildStatus.succeeded)["base"] for n in range(3)]
        outputs = [b.outputs[0].path for b in evaluations]
        oldest, middle, newest = (b.evaluation_id for b in evaluations)
        session.execute(text("UPDATE evaluations SET created_at = now() - interval '40 days' "
                             "WHERE id IN (:a, :b)"), {"a": oldest, "b": middle})
        session.commit()
        # no age limit: the keep_nr window alone decides
        assert wanted_roots(session, 0) >= set(outputs)
        # 30 days: the two old evaluations leave the window
        wanted = wanted_roots(session, 30)
        assert outputs[2] in wanted
        assert not wanted & {outputs[0], outputs[1]}
        # a kept build stays whatever its age
        session.execute(text("UPDATE builds SET keep = true WHERE id = :id"),
                        {"id": evaluations[0].id})
        # and when even the newest evaluation is old, it keeps its roots
        session.execute(text("UPDATE evaluations SET created_at = now() - interval '90 days' "
                             "WHERE id = :id"), {"id": newest})
        session.commit()
        wanted = wanted_roots(session, 30)
        assert {outputs[0], outputs[2]} <= wanted
        assert outputs[1] not in wanted
