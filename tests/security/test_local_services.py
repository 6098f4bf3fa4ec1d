"""A build's user cannot reach the private PostgreSQL and Redis of ``circus up``.

Both trust whoever can open their Unix socket. A pull request's derivation runs as
a Nix build user: it builds here, for real, and tries to connect.
"""

from __future__ import annotations

import secrets
import subprocess
from pathlib import Path

from circus.common.localservices import PrivatePostgres, PrivateRedis
from circus.common.nix.environment import nix_environ

ATTACK = r'''
derivation {{
  name = "reach-the-database-{nonce}";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" ''
    /usr/bin/psql -h {pg_socket_dir} -U postgres -d postgres -tAc "select 'pg-answered'" \
      > $out 2>&1 || echo "psql exit $?" >> $out
    /usr/bin/redis-cli -s {redis_socket} ping >> $out 2>&1 || echo "redis-cli exit $?" >> $out
  '' ];
}}
'''


def test_a_derivation_cannot_connect_to_the_private_database_or_broker(tmp_path: Path) -> None:
    base = Path(f"/tmp/circus-sock-{secrets.token_hex(4)}")
    postgres = PrivatePostgres(base / "postgres", durable=False)
    redis = PrivateRedis(base / "redis", durable=False)
    postgres.start()
    redis.start()
    try:
        # the owner (root here, as circus up's daemons) still connects
        own = subprocess.run(["psql", "-h", str(postgres.socket_dir), "-U", "postgres", "-tAc",
                              "select 'pg-answered'"], capture_output=True, text=True)
        assert own.stdout.strip() == "pg-answered", own.stderr
        expression = tmp_path / "attack.nix"
        expression.write_text(ATTACK.format(nonce=secrets.token_hex(6),
                                            pg_socket_dir=postgres.socket_dir,
                                            redis_socket=redis.socket))
        built = subprocess.run(["nix-build", str(expression), "--no-out-link"],
                               capture_output=True, text=True, env=nix_environ([]), timeout=120)
        assert built.returncode == 0, built.stderr
        seen = Path(built.stdout.strip()).read_text()
        assert "pg-answered" not in seen
        assert "PONG" not in seen
        assert "psql exit 2" in seen
        assert "redis-cli exit" in seen
    finally:
        redis.stop()
        postgres.stop()
        subprocess.run(["rm", "-rf", str(base)], check=False)


def test_the_postgres_user_cannot_make_root_write_through_the_owner_note(
        tmp_path: Path) -> None:
    """A cluster whose directory the postgres user cannot reach lives in
    /var/lib/circus/postgres-<digest>, owned by that user; root writes ``OWNER`` there at
    each start. The postgres user replaces it by a symlink to a file of root's: the next
    start writes a new note, never through the link."""
    directory = tmp_path / "state" / "postgres"   # under pytest's 0700 base
    postgres = PrivatePostgres(directory, durable=False)
    postgres.start()
    try:
        postgres.stop()
        assert postgres.outside
        victim = tmp_path / "root-only"
        victim.write_text("root's own\n")
        note = postgres.home / "OWNER"
        planted = subprocess.run(
            ["runuser", "-u", "postgres", "--", "ln", "-sfn", str(victim), str(note)],
            capture_output=True, text=True)
        assert planted.returncode == 0, planted.stderr   # the attacker may do this
        assert note.is_symlink()
        postgres.start()
        assert victim.read_text() == "root's own\n"
        assert not note.is_symlink()
        assert note.read_text() == f"{directory}\n"
    finally:
        postgres.remove()
