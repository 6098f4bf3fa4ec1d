"""``circus backup DIR`` / ``circus restore DIR``: an instance's state in one directory.

A backup holds the database (``pg_dump`` custom format, consistent while the
instance runs), the instance's secrets (session key, cache signing key, admin
password), build logs and the binary cache's files, with a manifest. Restore
goes into a fresh state directory (or an empty configured database) and is
refused while an instance uses that state directory. The backup directory is
made 0700: it holds the signing key.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from circus.cli.up import configured, state_defaults, take_state_lock, user_raw_config
from circus.common.localservices import PrivatePostgres, ServiceError, pg_bindir

FORMAT = 1
DUMP = "database.dump"
SECRET_FILES = ("secret-key", "signing-key", "signing-key.pub", "admin-password")


class BackupError(RuntimeError):
    pass


class Located:
    """The database and directories of the instance whose state is ``state``."""

    def __init__(self, state: Path, environ: dict[str, str]) -> None:
        raw = user_raw_config(environ)
        self.state = state
        self.postgres: PrivatePostgres | None = None
        self.started_postgres = False
        url_file = configured(raw, "database.url_file")
        self.configured_url: str | None = configured(raw, "database.url") or (
            Path(url_file).read_text().strip() if url_file else None)
        defaults = state_defaults(state)
        self.log_dir = Path(configured(raw, "logs.log_dir") or defaults["logs.log_dir"])
        self.cache_dir = Path(configured(raw, "cache.cache_dir") or defaults["cache.cache_dir"])

    def database_url(self) -> str:
        if self.configured_url:
            url = make_url(self.configured_url).set(drivername="postgresql")
            return url.render_as_string(hide_password=False)
        self.postgres = PrivatePostgres(self.state / "postgres")
        self.started_postgres = not self.postgres.is_running()
        self.postgres.start()
        self.postgres.create_database("circus")
        return self.postgres.url("circus")

    def close(self) -> None:
        if self.postgres is not None and self.started_postgres:
            self.postgres.stop()


def _run(argv: list[str], what: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise BackupError(f"{what} failed: {done.stderr.strip()[-2000:]}")


def backup(state: Path, target: Path, environ: dict[str, str]) -> dict[str, Any]:
    if target.exists() and any(target.iterdir()):
        raise BackupError(f"{target} is not empty; back up into a new directory")
    target.mkdir(parents=True, exist_ok=True)
    target.chmod(0o700)
    located = Located(state, environ)
    try:
        _run([str(pg_bindir() / "pg_dump"), "--format=custom", "--no-owner",
              "--file", str(target / DUMP), located.database_url()], "pg_dump")
    finally:
        located.close()
    secrets = [name for name in SECRET_FILES if (state / name).is_file()]
    (target / "state").mkdir(mode=0o700)
    for name in secrets:
        shutil.copy2(state / name, target / "state" / name)
    copied = {}
    for what, directory in (("logs", located.log_dir), ("cache", located.cache_dir)):
        copied[what] = directory.is_dir()
        if directory.is_dir():
            shutil.copytree(directory, target / what, symlinks=True)
    manifest = {"format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "database": DUMP, "state_files": secrets, **copied}
    (target / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def restore(source: Path, state: Path, environ: dict[str, str]) -> dict[str, Any]:
    try:
        manifest: dict[str, Any] = json.loads((source / "manifest.json").read_text())
    except (OSError, ValueError) as exc:
        raise BackupError(f"{source} is not a Circus backup (manifest.json: {exc})") from exc
    if manifest.get("format") != FORMAT:
        raise BackupError(f"unknown backup format {manifest.get('format')!r}")
    lock = take_state_lock(state)
    if isinstance(lock, tuple):
        raise BackupError(f"another Circus instance (pid {lock[0]}, {lock[1]}) is using {state}")
    located = Located(state, environ)
    if located.configured_url is None and (state / "postgres").exists():
        raise BackupError(f"{state} already holds a database; restore into a fresh state directory")
    try:
        _run([str(pg_bindir() / "pg_restore"), "--no-owner", "--single-transaction",
              "--exit-on-error", "--dbname", located.database_url(),
              str(source / DUMP)], "pg_restore")
    finally:
        located.close()
        os.close(lock)
    for name in manifest["state_files"]:
        if name in SECRET_FILES:
            shutil.copy2(source / "state" / name, state / name)
            (state / name).chmod(0o600 if not name.endswith(".pub") else 0o644)
    for what, directory in (("logs", located.log_dir), ("cache", located.cache_dir)):
        if manifest.get(what):
            shutil.copytree(source / what, directory, symlinks=True, dirs_exist_ok=True)
    return manifest


def main(command: str, argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=f"circus {command}", description=__doc__)
    parser.add_argument("directory", type=Path,
                        help="the backup directory (written by backup, read by restore)")
    parser.add_argument("--state-dir", default=os.environ.get("CIRCUS_STATE_DIR") or ".circus",
                        help="the instance's state directory (default ./.circus)")
    args = parser.parse_args(argv)
    state = Path(args.state_dir).resolve()
    environ = dict(os.environ)
    try:
        if command == "backup":
            manifest = backup(state, args.directory.resolve(), environ)
            parts = ["database", *manifest["state_files"],
                     *(what for what in ("logs", "cache") if manifest[what])]
            print(f"backed up {state} to {args.directory}: {', '.join(parts)}")
        else:
            restore(args.directory.resolve(), state, environ)
            print(f"restored {args.directory} into {state}; start it with "
                  f"`circus up --state-dir {state}`")
    except (BackupError, ServiceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
