"""Where ``circus up``'s private PostgreSQL lives when the postgres user cannot reach the
state directory (a ``~/.circus`` under /root, pytest's 0700 base), and that it does not
outlive that directory unnoticed: the cluster names its owner, ``circus up`` reports a
cluster whose owner is gone, and ``remove`` takes it wherever it is."""

from __future__ import annotations

import secrets
import shutil
from pathlib import Path

import pytest

from circus.cli.up import Instance
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


def test_circus_up_names_a_cluster_whose_state_directory_is_gone(
        up_root: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(up_root)   # no circus.toml of the checkout's
    gone = up_root / "removed-state" / "postgres"
    orphan = FALLBACK_ROOT / f"postgres-test-{secrets.token_hex(6)}"
    (orphan / "data").mkdir(parents=True)
    (orphan / "OWNER").write_text(f"{gone}\n")
    (orphan / "data" / "PG_VERSION").write_text("15\n" * 1000)
    instance = Instance(up_root / "state", {"CIRCUS_BROKER__URL": "redis://127.0.0.1:1/0"})
    try:
        instance.prepare()
        printed = capsys.readouterr().out
        assert (f"note: {orphan} (0 MiB) is the PostgreSQL cluster of {gone}, which is gone; "
                f"remove it (rm -rf {orphan}) unless that directory comes back") in printed
        # reported, never removed: the directory may come back (a file system not mounted)
        assert orphan.exists()
        # this instance's own cluster is reachable here: inside its state directory
        assert instance.postgres is not None
        assert not instance.postgres.outside
        assert "its data lives in" not in printed
    finally:
        instance.stop()
        shutil.rmtree(orphan, ignore_errors=True)
