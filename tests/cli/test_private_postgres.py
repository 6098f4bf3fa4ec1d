"""Where ``circus up``'s private PostgreSQL lives when the postgres user cannot reach the
state directory (a ``~/.circus`` under /root, pytest's 0700 base), and that it does not
outlive that directory unnoticed: the cluster names its owner, ``circus up`` reports a
cluster whose owner is gone, and ``remove`` takes it wherever it is."""

from __future__ import annotations

import shutil
from pathlib import Path

from circus.common.localservices import FALLBACK_ROOT, PrivatePostgres, orphaned_clusters


def test_a_cluster_outside_its_directory_names_its_owner_and_is_found_when_orphaned(
        tmp_path: Path) -> None:
    state = tmp_path / "state"   # under pytest's root-owned 0700 base
    postgres = PrivatePostgres(state / "postgres", durable=False)
    postgres.start()
    home = postgres.home
    try:
        assert postgres.outside
        assert home.parent == FALLBACK_ROOT
        assert (home / "OWNER").read_text().strip() == str(state / "postgres")
        # the next start finds it through the note in the state directory
        assert PrivatePostgres(state / "postgres").home == home
        assert (home, state / "postgres") not in orphaned_clusters()

        # the state directory goes (rm -rf .circus) while PostgreSQL still runs: not an
        # orphan yet, whatever the note says
        shutil.move(state, tmp_path / "moved-away")
        assert (home, state / "postgres") not in orphaned_clusters()
        shutil.move(tmp_path / "moved-away", state)
        postgres.stop()
        assert (home, state / "postgres") not in orphaned_clusters()
        # stopped and its directory gone: an orphan, reported with its former owner
        shutil.move(state, tmp_path / "moved-away")
        assert (home, state / "postgres") in orphaned_clusters()
        shutil.move(tmp_path / "moved-away", state)
    finally:
        postgres.remove()
    assert not home.exists()
    assert not (state / "postgres").exists()


def test_orphaned_clusters_skips_the_unknown_and_the_owned(tmp_path: Path) -> None:
    owned, gone, unknown = (tmp_path / f"postgres-{n}" for n in ("owned", "gone", "unknown"))
    for home in (owned, gone, unknown):
        (home / "data").mkdir(parents=True)
    state = tmp_path / "state" / "postgres"
    state.mkdir(parents=True)
    (state / "LOCATION").write_text(f"PostgreSQL data lives in {owned}\n")
    (owned / "OWNER").write_text(f"{state}\n")
    (gone / "OWNER").write_text(f"{tmp_path / 'removed' / 'postgres'}\n")
    # made before OWNER was written: whose it is cannot be told, so it is not reported
    assert orphaned_clusters(tmp_path) == [(gone, tmp_path / "removed" / "postgres")]
