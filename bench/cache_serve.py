"""Binary-cache serving speed: Circus's /nix-cache against a static file server.

Builds N small store paths and one large one, publishes them through
``publish_outputs`` into a private PostgreSQL, writes the same paths with
``nix copy --to file://…`` and serves that directory with a static server
(nginx when installed, else a minimal gunicorn sendfile app). Then wrk (or a
Python load generator when wrk is missing) measures, in the same run:

- narinfo requests/s, rotating over all N hashes: Circus warm (LRU hits, answered
  on the HTTP worker's event loop), Circus cold (a server whose LRU holds one
  entry, so every request is a database lookup: batched on the event loop), and
  the static server;
- misses (404) requests/s, rotating over 10·N hashes no cache holds, from the
  cold Circus server and the static server (a client asking for a closure it
  has to build mostly gets these);
- NAR throughput (MB/s) of the large path from both.

Prints the figures and ratios; asserts nothing.

With ``--reference <checkout>`` the circus-server of another checkout (the main
branch, say) is measured in the same run beside this one: on a shared host, the
only fair before/after.

    .venv/bin/python bench/cache_serve.py [--paths 500] [--nar-mib 128] [--seconds 5] \
        [--reference ../main]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy.orm import Session  # noqa: E402

from circus.cache.publish import publish_outputs  # noqa: E402
from circus.cli.migrate import upgrade  # noqa: E402
from circus.common.config import load_settings  # noqa: E402
from circus.common.db import make_engine, make_session_factory  # noqa: E402
from circus.common.enums import BuildStatus, EvaluationStatus, TriggerKind  # noqa: E402
from circus.common.localservices import PrivatePostgres  # noqa: E402
from circus.common.models import Build, BuildOutput, Evaluation, Jobset, Project  # noqa: E402
from circus.common.nix import base32  # noqa: E402
from circus.common.nix.environment import nix_environ  # noqa: E402
from circus.common.nix.signing import generate_key_pair  # noqa: E402
from tests.helpers.daemons import Daemon, circus_command  # noqa: E402
from tests.helpers.net import free_port, wait_for_http  # noqa: E402

VENV_BIN = Path(sys.executable).parent


def build_paths(count: int, nar_mib: int, tag: str) -> tuple[list[str], str]:
    small = " ".join(
        f'(derivation {{ name = "bench-cache-{tag}-{i}"; builder = "/bin/sh"; '
        f'system = builtins.currentSystem; args = ["-c" "echo {tag} {i} > $out"]; }})'
        for i in range(count))
    big = (f'(derivation {{ name = "bench-cache-{tag}-big"; builder = "/bin/sh"; '
           'system = builtins.currentSystem; args = ["-c" '
           f'"export PATH=/usr/bin:/bin; head -c {nar_mib}M /dev/urandom > $out"]; }})')
    out = subprocess.run(["nix-build", "--no-out-link", "-j4", "-E", f"[ {small} {big} ]"],
                         capture_output=True, text=True, check=True,
                         env=nix_environ([])).stdout.split()
    return out[:-1], out[-1]


def record_and_publish(settings: object, paths: list[str], big: str) -> None:
    engine = make_engine(settings)  # type: ignore[arg-type]
    factory = make_session_factory(engine)
    with factory.begin() as session:
        project = Project(name="bench")
        session.add(project)
        session.flush()
        jobset = Jobset(project_id=project.id, name="main")
        session.add(jobset)
        session.flush()
        evaluation = Evaluation(jobset_id=jobset.id, trigger_kind=TriggerKind.manual,
                                status=EvaluationStatus.completed)
        session.add(evaluation)
        session.flush()
        build_ids = []
        for i, path in enumerate([*paths, big]):
            build = Build(evaluation_id=evaluation.id, jobset_id=jobset.id,
                          project_id=project.id, job_name=f"job{i}", drv_path=path + ".drv",
                          system="x86_64-linux", status=BuildStatus.succeeded)
            build.outputs.append(BuildOutput(name="out", path=path))
            session.add(build)
            session.flush()
            build_ids.append(build.id)
    started = time.monotonic()
    with factory.begin() as session:
        _publish_all(session, settings, build_ids)
    print(f"publish_outputs: {len(build_ids)} builds in {time.monotonic() - started:.1f} s")
    engine.dispose()


def _publish_all(session: Session, settings: object, build_ids: list[int]) -> None:
    for build_id in build_ids:
        publish_outputs(session, settings, build_id)  # type: ignore[arg-type]


def start_circus(work: Path, settings_toml: str, port: int, code: Path | None = None) -> Daemon:
    """circus-server with ``settings_toml``; ``code``: another checkout's Circus instead."""
    config = work / f"circus-{port}.toml"
    config.write_text(settings_toml)
    env = {**os.environ, "CIRCUS_CONFIG_FILE": str(config)}
    if code is not None:
        env["PYTHONPATH"] = str(code)
    daemon = Daemon(f"circus-server-{port}", [circus_command("circus-server"), "--port",
                                              str(port)], work, env=env).start()
    _wait_or_stop(daemon, f"http://127.0.0.1:{port}/nix-cache/nix-cache-info")
    return daemon


def _wait_or_stop(daemon: Daemon, url: str) -> None:
    try:
        wait_for_http(url, timeout=60)
    except BaseException:
        daemon.stop()
        raise


def find_nginx() -> str | None:
    return shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists()
                                     else None)


def start_static(work: Path, root: Path, port: int, nginx: str | None) -> Daemon:
    if nginx:
        prefix = work / "nginx"
        (prefix / "logs").mkdir(parents=True, exist_ok=True)
        conf = prefix / "nginx.conf"
        conf.write_text(textwrap.dedent(f"""
            daemon off;
            {"user root;" if os.geteuid() == 0 else ""}
            worker_processes 2;
            pid {prefix}/nginx.pid;
            error_log {prefix}/logs/error.log;
            events {{ worker_connections 1024; }}
            http {{
                access_log off;
                sendfile on;
                tcp_nopush on;
                keepalive_requests 100000;
                client_body_temp_path {prefix}/tmp;
                proxy_temp_path {prefix}/tmp;
                fastcgi_temp_path {prefix}/tmp;
                uwsgi_temp_path {prefix}/tmp;
                scgi_temp_path {prefix}/tmp;
                types {{ text/x-nix-narinfo narinfo; }}
                default_type application/octet-stream;
                server {{
                    listen 127.0.0.1:{port};
                    root {root};
                }}
            }}
        """))
        (prefix / "tmp").mkdir(exist_ok=True)
        daemon = Daemon("nginx", [nginx, "-p", str(prefix), "-c", str(conf)], work).start()
    else:
        app = work / "static_app.py"
        app.write_text(textwrap.dedent(f"""
            import os
            ROOT = {str(root)!r}
            def app(environ, start_response):
                path = os.path.normpath(environ["PATH_INFO"]).lstrip("/")
                full = os.path.join(ROOT, path)
                if ".." in path or not os.path.isfile(full):
                    start_response("404 Not Found", [("Content-Length", "0")])
                    return []
                start_response("200 OK", [("Content-Length", str(os.path.getsize(full)))])
                return environ["wsgi.file_wrapper"](open(full, "rb"), 1 << 20)
        """))
        daemon = Daemon("static", [str(VENV_BIN / "gunicorn"), "-w", "2", "-k", "gthread",
                                   "--threads", "32", "-b", f"127.0.0.1:{port}",
                                   "--chdir", str(work), "static_app:app"], work).start()
    _wait_or_stop(daemon, f"http://127.0.0.1:{port}/nix-cache-info")
    return daemon


def wrk(urls: list[str], seconds: int, connections: int, work: Path,
        expect_status: int = 200) -> tuple[float, float]:
    """(requests/s, bytes/s) from wrk rotating over ``urls`` on one host; every answer
    must have ``expect_status``."""
    base = re.match(r"(http://[^/]+)", urls[0]).group(1)  # type: ignore[union-attr]
    paths = [u[len(base):] for u in urls]
    script = work / f"rotate-{len(paths)}-{expect_status}.lua"
    script.write_text("paths = {" + ",".join(f'"{p}"' for p in paths) + "}\n"
                      + f"expected = {expect_status}\n" + textwrap.dedent("""
        counter = 0
        unexpected = 0
        request = function()
            counter = counter + 1
            return wrk.format("GET", paths[(counter % #paths) + 1])
        end
        response = function(status, headers, body)
            if status ~= expected then unexpected = unexpected + 1 end
        end
        threads = {}
        setup = function(thread) table.insert(threads, thread) end
        done = function(summary, latency, requests)
            for _, thread in ipairs(threads) do
                io.write(string.format("unexpected: %d\\n", thread:get("unexpected")))
            end
        end
    """))
    done = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "-s", str(script),
                           base], capture_output=True, text=True, check=True)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", done.stdout).group(1))  # type: ignore[union-attr]
    match = re.search(r"Transfer/sec:\s+([\d.]+)([KMG]?B)", done.stdout)
    assert match
    scale = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3}[match.group(2)]
    # wrk's own "Non-2xx" count cannot check 404s; the script counts other statuses
    if any(int(n) for n in re.findall(r"unexpected: (\d+)", done.stdout)):
        raise RuntimeError(f"wrk saw answers other than {expect_status}:\n{done.stdout}")
    return rps, float(match.group(1)) * scale


def python_load(urls: list[str], seconds: int, connections: int,
                expect_status: int = 200) -> tuple[float, float]:
    import http.client
    import threading
    from urllib.parse import urlsplit

    counts = [0] * connections
    sizes = [0] * connections
    deadline = time.monotonic() + seconds

    def worker(slot: int) -> None:
        parts = urlsplit(urls[0])
        conn = http.client.HTTPConnection(parts.netloc)
        i = slot
        while time.monotonic() < deadline:
            conn.request("GET", urlsplit(urls[i % len(urls)]).path)
            response = conn.getresponse()
            sizes[slot] += len(response.read())
            if response.status != expect_status:
                raise RuntimeError(f"{urls[i % len(urls)]}: {response.status}")
            counts[slot] += 1
            i += connections

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts) / seconds, sum(sizes) / seconds


def measure(urls: list[str], seconds: int, connections: int, work: Path,
            expect_status: int = 200) -> tuple[float, float]:
    if shutil.which("wrk"):
        return wrk(urls, seconds, connections, work, expect_status)
    return python_load(urls, seconds, min(connections, 8), expect_status)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--paths", type=int, default=500)
    parser.add_argument("--nar-mib", type=int, default=128)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="circus-server workers")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reference", type=Path, metavar="CHECKOUT",
                        help="also measure the circus-server of another checkout (e.g. the "
                             "main branch), in the same run: a before/after on a shared host")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="circus-bench-cache-"))
    postgres = None
    daemons: list[Daemon] = []
    try:
        server_url = os.environ.get("CIRCUS_BENCH_DATABASE_URL")
        if not server_url:
            postgres = PrivatePostgres(Path(f"/tmp/circus-bench-pg-{os.getpid()}"), durable=False)
            postgres.start()
            server_url = postgres.url("postgres")
        upgrade(server_url)
        secret, public = generate_key_pair("circus-bench-1")
        cache_dir = work / "cache"
        sections = {
            "database": {"url": server_url},
            "broker": {"url": "redis://127.0.0.1:1/0"},
            "nix": {"substituters": []},
            "cache": {"cache_dir": str(cache_dir), "compression": "zstd"},
            "signing": {"enabled": True, "key": secret},
        }
        settings = load_settings(files=[], environ={}, overrides=sections)
        tag = str(time.time_ns())
        print(f"building {args.paths} small paths and one {args.nar_mib} MiB path ...")
        paths, big = build_paths(args.paths, args.nar_mib, tag)
        record_and_publish(settings, paths, big)

        static_root = work / "static"
        subprocess.run(["nix", "copy", "--to", f"file://{static_root}?compression=zstd",
                        *paths, big], check=True, env=nix_environ([]), capture_output=True)

        def toml(cache_size: int, workers: int) -> str:
            return textwrap.dedent(f"""
                [database]
                url = "{server_url}"
                [broker]
                url = "redis://127.0.0.1:1/0"
                [server]
                workers = {workers}
                secret_key = "{'x' * 40}"
                [cache]
                cache_dir = "{cache_dir}"
                narinfo_cache_size = {cache_size}
                narinfo_cache_ttl_secs = 3600
                [tracing]
                level = "warning"
            """)

        # (warm, cold) ports of each Circus measured
        circuses: dict[str, tuple[int, int]] = {}
        for label, code in (("circus", None), ("reference", args.reference)):
            if label == "reference" and code is None:
                continue
            warm_port, cold_port = free_port(), free_port()
            daemons.append(start_circus(work, toml(65536, args.workers), warm_port, code))
            daemons.append(start_circus(work, toml(1, args.workers), cold_port, code))
            circuses[label] = warm_port, cold_port
        warm_port = circuses["circus"][0]
        # baselines: nginx when installed, and always a minimal gunicorn sendfile app
        # (the same server stack as circus-server, so it isolates Circus's own overhead)
        statics: dict[str, int] = {}
        nginx = find_nginx()
        for name, binary in (("nginx", nginx), ("gunicorn static", None)):
            if name == "nginx" and not binary:
                continue
            port = free_port()
            daemons.append(start_static(work, static_root, port, binary))
            statics[name] = port

        hashes = [Path(p).name[:32] for p in paths]
        narinfo_urls = {
            **{f"{label} {kind}": [f"http://127.0.0.1:{port}/nix-cache/{h}.narinfo"
                                   for h in hashes]
               for label, ports in circuses.items()
               for kind, port in zip(("warm", "cold"), ports, strict=True)},
            **{name: [f"http://127.0.0.1:{port}/{h}.narinfo" for h in hashes]
               for name, port in statics.items()},
        }
        # hashes nobody published (drawn like real ones, never equal to one of ours)
        missing = [base32.encode(os.urandom(20)) for _ in range(10 * len(hashes))]
        miss_urls = {
            **{f"{label} miss": [f"http://127.0.0.1:{ports[1]}/nix-cache/{h}.narinfo"
                                 for h in missing]
               for label, ports in circuses.items()},
            **{f"{name} miss": [f"http://127.0.0.1:{port}/{h}.narinfo" for h in missing]
               for name, port in statics.items()},
        }
        # every worker process and thread sees each hash at least once
        for _ in range(3):
            for label in circuses:
                for url in narinfo_urls[f"{label} warm"]:
                    urllib.request.urlopen(url).read()

        narinfo = urllib.request.urlopen(
            f"http://127.0.0.1:{warm_port}/nix-cache/{Path(big).name[:32]}.narinfo").read()
        nar_url = next(line.split(": ")[1] for line in narinfo.decode().splitlines()
                       if line.startswith("URL:"))
        static_narinfo = (static_root / f"{Path(big).name[:32]}.narinfo").read_text()
        static_nar = next(line.split(": ")[1] for line in static_narinfo.splitlines()
                          if line.startswith("URL:"))
        nar_urls = {"circus": f"http://127.0.0.1:{warm_port}/nix-cache/{nar_url}",
                    **{name: f"http://127.0.0.1:{port}/{static_nar}"
                       for name, port in statics.items()}}

        s, c = args.seconds, args.connections
        rps: dict[str, list[float]] = {}
        mibs: dict[str, list[float]] = {}
        # alternate the servers over several rounds: the machine is shared, medians are fairer
        for _ in range(args.rounds):
            for name, urls in narinfo_urls.items():
                rps.setdefault(name, []).append(measure(urls, s, c, work)[0])
            for name, urls in miss_urls.items():
                rps.setdefault(name, []).append(measure(urls, s, c, work, 404)[0])
            for name, url in nar_urls.items():
                mibs.setdefault(name, []).append(measure([url], s, 4, work)[1] / 2**20)

        rounded = {k: [round(x) for x in v] for k, v in rps.items()}
        print(f"\nper-round samples: narinfo/s {rounded}")
        rounded = {k: [round(x) for x in v] for k, v in mibs.items()}
        print(f"                   NAR MiB/s {rounded}")
        print(f"\nnarinfo requests/s, median of {args.rounds} ({len(hashes)} hashes, "
              f"{c} connections, {s} s each, circus-server workers={args.workers}):")
        for name, values in rps.items():
            # a miss is compared with the static server's misses
            suffix = " miss" if name.endswith(" miss") else ""
            ratios = "  ".join(
                f"{statistics.median(values) / statistics.median(rps[b + suffix]):5.2f}"
                f" of {b}{suffix}" for b in statics)
            print(f"  {name:18s} {statistics.median(values):9.0f}   {ratios}")
        print(f"\nNAR throughput, median of {args.rounds} ({args.nar_mib} MiB, 4 connections):")
        for name, values in mibs.items():
            ratios = "  ".join(f"{statistics.median(values) / statistics.median(mibs[b]):5.2f}"
                               f" of {b}" for b in statics)
            print(f"  {name:18s} {statistics.median(values):9.0f} MiB/s   {ratios}")
        print(f"\npublic key: {public}")
        return 0
    except BaseException:
        # what the servers said is the first thing to look at when a run fails
        for daemon in daemons:
            errors = [line for line in daemon.log().splitlines()
                      if "Error" in line or "error" in line or "Traceback" in line]
            if errors:
                print(f"--- {daemon.name}: {len(errors)} error line(s), last ones:",
                      *errors[-15:], sep="\n", file=sys.stderr)
        raise
    finally:
        for daemon in daemons:
            daemon.stop()
        if postgres is not None:
            postgres.remove()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
