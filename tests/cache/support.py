"""Helpers for the binary-cache tests: test derivations, build rows, a server, a Nix client."""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.orm import Session
from werkzeug.serving import make_server

from circus.common.config import Settings
from circus.common.db import make_engine
from circus.common.enums import BuildStatus, EvaluationStatus, TriggerKind
from circus.common.models import Build, BuildOutput, Evaluation, Jobset, Project
from circus.common.nix.derivation import parse_derivation
from circus.common.nix.environment import nix_environ
from circus.server.app import create_app
from tests.helpers.net import free_port


def closure_expr(nonce: str, blob_kib: int = 64) -> str:
    """A two-output derivation whose ``out`` references a dependency tree.

    The dependency has every kind of NAR node: nested dirs, an empty dir, an
    executable, a symlink, an empty file and a blob spanning several chunks.
    """
    dep = (f'derivation {{ name = "circus-cache-dep-{nonce}"; builder = "/bin/sh"; '
           'system = builtins.currentSystem; args = ["-c" '
           '"export PATH=/usr/bin:/bin; mkdir -p $out/bin $out/share/empty-dir; '
           f"printf 'data {nonce}' > $out/share/data; "
           "printf '#!/bin/sh\\\\necho hi\\\\n' > $out/bin/hello; chmod +x $out/bin/hello; "
           f"ln -s ../share/data $out/link; : > $out/empty; "
           f'head -c {blob_kib * 1024} /dev/urandom > $out/share/blob"]; }}')
    return (f'let dep = {dep}; in derivation {{ name = "circus-cache-main-{nonce}"; '
            'builder = "/bin/sh"; system = builtins.currentSystem; outputs = ["out" "doc"]; '
            'args = ["-c" "export PATH=/usr/bin:/bin; mkdir -p $out; '
            f'echo ${{dep}} > $out/dep-path; echo {nonce} > $out/id; echo doc > $doc"]; }}')


def simple_expr(nonce: str, body: str = "hello") -> str:
    return (f'derivation {{ name = "circus-cache-simple-{nonce}"; builder = "/bin/sh"; '
            f'system = builtins.currentSystem; args = ["-c" "echo {body} {nonce} > $out"]; }}')


@dataclass(frozen=True)
class Built:
    drv_path: str
    outputs: dict[str, str]


def nix_build(expr: str) -> Built:
    env = nix_environ([])
    drv = subprocess.run(["nix-instantiate", "-E", expr], capture_output=True, text=True,
                         env=env, check=True).stdout.strip()
    subprocess.run(["nix-store", "--realise", drv], capture_output=True, text=True, env=env,
                   check=True)
    derivation = parse_derivation(Path(drv).read_text())
    return Built(drv, derivation.output_paths)


def make_build(session: Session, built: Built, *, project: str = "demo",
               jobset: str = "main", job: str = "job",
               evaluation: Evaluation | None = None, keep: bool = False,
               cache_enabled: bool = True) -> Build:
    """Rows for a succeeded build of ``built`` (what the queue runner leaves behind)."""
    if evaluation is None:
        project_row = session.query(Project).filter_by(name=project).one_or_none()
        if project_row is None:
            project_row = Project(name=project, cache_enabled=cache_enabled)
            session.add(project_row)
            session.flush()
        jobset_row = session.query(Jobset).filter_by(project_id=project_row.id,
                                                     name=jobset).one_or_none()
        if jobset_row is None:
            jobset_row = Jobset(project_id=project_row.id, name=jobset)
            session.add(jobset_row)
            session.flush()
        evaluation = Evaluation(jobset_id=jobset_row.id, trigger_kind=TriggerKind.manual,
                                status=EvaluationStatus.completed)
        session.add(evaluation)
        session.flush()
    jobset_row = session.get(Jobset, evaluation.jobset_id)
    assert jobset_row is not None
    build = Build(evaluation_id=evaluation.id, jobset_id=jobset_row.id,
                  project_id=jobset_row.project_id, job_name=job, drv_path=built.drv_path,
                  system="x86_64-linux", status=BuildStatus.succeeded, keep=keep)
    for name, path in built.outputs.items():
        build.outputs.append(BuildOutput(name=name, path=path))
    session.add(build)
    session.flush()
    return build


@contextmanager
def serve(settings: Settings) -> Iterator[str]:
    """The real Flask app on a loopback port (werkzeug, threaded); yields its base URL."""
    engine = make_engine(settings, pool_size=4)
    app = create_app(settings, engine=engine)
    port = free_port()
    server = make_server("127.0.0.1", port, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.shutdown()
        thread.join(10)
        if "circus_cache" in app.extensions:
            app.extensions["circus_cache"].close()  # its listener and connections
        engine.dispose()


def nix_client_env(tmp: Path) -> dict[str, str]:
    """Nix with no substituters and a private narinfo disk cache (no stale answers)."""
    env = nix_environ([], extra={"narinfo-cache-negative-ttl": "0",
                                 "narinfo-cache-positive-ttl": "0"})
    env["XDG_CACHE_HOME"] = str(tmp / "xdg-cache")
    return env


def nix_copy(cache_url: str, paths: list[str], public_key: str, store: Path
             ) -> subprocess.CompletedProcess[str]:
    """``nix copy --from <cache> --to <fresh chroot store>`` verifying signatures."""
    return subprocess.run(
        ["nix", "copy", "--from", cache_url, "--to", str(store), *paths,
         "--option", "trusted-public-keys", public_key],
        capture_output=True, text=True, env=nix_client_env(store.parent), timeout=120)


def store_has(store: Path, path: str) -> bool:
    """Whether the chroot store at ``store`` holds ``path`` as a valid path."""
    done = subprocess.run(["nix-store", "--store", str(store), "--check-validity", path],
                          capture_output=True, text=True, env=nix_environ([]))
    return done.returncode == 0
