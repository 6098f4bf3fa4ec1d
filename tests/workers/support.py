"""What the remote-worker tests share: a circus-server with ``/api/v1/workers`` and a
dispatching queue runner, circus-workers in private stores, calls to the worker API."""

from __future__ import annotations

import hashlib
import shlex
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from tests.conftest import KeyPair
from tests.helpers.daemons import Daemon
from tests.helpers.net import wait_for_port
from tests.helpers.worker_hosts import worker_command, worker_env, write_worker_config
from tests.queue_runner.daemons import runner_daemon, server_daemon

ROOT = Path(__file__).resolve().parents[2]
JOBS = ROOT / "tests" / "agents" / "fixtures" / "jobs.nix"
TOKEN = "worker-token-" + "w" * 40
OTHER_TOKEN = "worker-token-" + "o" * 40
DIGESTS = [hashlib.sha256(t.encode()).hexdigest() for t in (TOKEN, OTHER_TOKEN)]


@contextmanager
def server_and_runner(runner_config: Callable[..., dict[str, Any]],
                      tmp_path: Path, cache_key: KeyPair, lease_secs: int = 20,
                      unsupported_timeout: int = 120) -> Iterator[str]:
    """A queue runner without local workers (dispatcher, reconciler) and a circus-server
    (two gunicorn workers) whose /api/v1/workers accepts TOKEN and OTHER_TOKEN; yields
    the server's URL."""
    config = runner_config(
        queue_runner={"unsupported_timeout": unsupported_timeout, "lease_secs": lease_secs},
        signing={"enabled": True, "key": cache_key.secret},
        cache={"cache_dir": str(tmp_path / "cache")},
        remote_workers={"auth_tokens": DIGESTS},
        server={"secret_key": "s" * 40, "workers": 2, "rate_limit_storage": "memory://",
                "require_api_key_for_reads": False})
    server, port = server_daemon(config, tmp_path)
    with runner_daemon("qr-dispatch", config, tmp_path, workers=0), server:
        wait_for_port(port, timeout=60)
        yield f"http://127.0.0.1:{port}"
        print(server.log()[-3000:])


def worker_in_own_store(name: str, directory: Path, server_url: str, broker_url: str,
                        token: str = TOKEN, slots: int = 2, features: tuple[str, ...] = ()
                        ) -> Daemon:
    """A circus-worker whose /nix is a private bind mount: paths really have to travel."""
    (directory / "nix").mkdir(parents=True, exist_ok=True)
    config = write_worker_config(directory, name, server_url, broker_url, token, slots,
                                 features=features)
    inner = " ".join(shlex.quote(a) for a in worker_command(config))
    script = f"mount --bind {shlex.quote(str(directory / 'nix'))} /nix && exec {inner}"
    return Daemon(name, ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                  directory, env=worker_env())


def signatures_in(directory: Path, path: str) -> str:
    """``nix path-info --sigs`` of ``path`` in the private store under ``directory``:
    a path substituted from a binary cache keeps the cache's signature, an imported one
    has none."""
    # --derivation: a .drv itself (Nix 2.8 reads an output path as its deriver then)
    flag = "--derivation " if path.endswith(".drv") else ""
    script = (f"mount --bind {shlex.quote(str(directory / 'nix'))} /nix && "
              f"nix --extra-experimental-features nix-command path-info --sigs {flag}"
              f"{shlex.quote(path)}")
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                           script], capture_output=True, check=True)
    return done.stdout.decode()


def cache_get(server: str, path: str, auth: tuple[str, str] | None = None,
              prefix: str = "/nix-cache") -> requests.Response:
    """The narinfo of ``path`` (or, given a ``nar/...`` URL, that NAR)."""
    name = path if path.startswith("nar/") else Path(path).name.split("-")[0] + ".narinfo"
    return requests.get(f"{server}{prefix}/{name}", auth=auth, timeout=30)


def api(server: str, path: str, token: str = TOKEN, name: str = "w1", **kwargs: Any
        ) -> requests.Response:
    method = kwargs.pop("method", "POST")
    headers = {"Authorization": f"Bearer {token}", "X-Circus-Worker": name,
               **kwargs.pop("headers", {})}
    return requests.request(method, f"{server}/api/v1/workers{path}", headers=headers,
                            timeout=60, **kwargs)


def step_rows(factory: sessionmaker[Session], drvs: list[str]) -> list[Any]:
    with factory() as session:
        return list(session.execute(text(
            "SELECT id, drv_path, state, status, machine, worker, error_message FROM steps "
            "WHERE drv_path = ANY(:drvs) ORDER BY id"), {"drvs": drvs}).all())


def exported_in_private_store(directory: Path, content: str) -> tuple[str, bytes]:
    """A store path that exists only in a private store, and its export stream."""
    (directory / "nix").mkdir(parents=True, exist_ok=True)
    source = directory / "payload"
    source.write_text(content)
    script = (f"mount --bind {shlex.quote(str(directory / 'nix'))} /nix && "
              f"p=$(nix-store --add {shlex.quote(str(source))}) && echo $p >&2 && "
              f"nix-store --export $p")
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                           script], capture_output=True, check=True)
    return done.stderr.decode().strip().splitlines()[-1], done.stdout


