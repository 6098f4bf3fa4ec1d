"""deploy/: the nginx example and the systemd units for hosts without NixOS."""

from __future__ import annotations

import configparser
import json
import shutil
import subprocess
from pathlib import Path

from circus.common.nix.environment import nix_environ

REPO = Path(__file__).resolve().parents[2]
NGINX_EXAMPLE = REPO / "deploy" / "nginx" / "circus.conf"
UNITS = REPO / "deploy" / "systemd"
HARDENING_NIX = REPO / "deploy" / "nixos" / "hardening.nix"
DAEMONS = ("circus-server", "circus-evaluator", "circus-queue-runner")


def make_certificate(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "fullchain.pem", directory / "privkey.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=ci.example.org", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def test_nginx_example_passes_nginx_t(tmp_path: Path) -> None:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    assert Path(nginx).exists(), "nginx is missing (scripts/setup-system.sh installs nginx-light)"
    cert, key = make_certificate(tmp_path)
    # the example as an operator installs it, with this test's certificate and cache dir
    site = NGINX_EXAMPLE.read_text() \
        .replace("/etc/ssl/circus/fullchain.pem", str(cert)) \
        .replace("/etc/ssl/circus/privkey.pem", str(key)) \
        .replace("/var/cache/nginx/circus", str(tmp_path / "cache"))
    (tmp_path / "circus.conf").write_text(site)
    (tmp_path / "nginx.conf").write_text(f"""
pid {tmp_path}/nginx.pid;
error_log {tmp_path}/error.log;
events {{}}
http {{
    access_log off;
    client_body_temp_path {tmp_path}/body;
    proxy_temp_path {tmp_path}/proxy;
    include {tmp_path}/circus.conf;
}}
""")
    checked = subprocess.run([nginx, "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stderr
    assert "test is successful" in checked.stderr
    assert "[warn]" not in checked.stderr, checked.stderr


def units() -> dict[str, configparser.ConfigParser]:
    found = {}
    for path in sorted(UNITS.glob("*.service")):
        parser = configparser.ConfigParser(interpolation=None, strict=False)
        parser.optionxform = str  # type: ignore[assignment,method-assign]
        parser.read(path)
        found[path.stem] = parser
    return found


def test_units_carry_the_nixos_modules_hardening_and_restart_on_failure(tmp_path: Path
                                                                        ) -> None:
    done = subprocess.run(["nix-instantiate", "--eval", "--strict", "--json", str(HARDENING_NIX)],
                          capture_output=True, text=True, env=nix_environ([]), check=True)
    hardening = {key: ("true" if value is True else value)
                 for key, value in json.loads(done.stdout).items()}
    found = units()
    assert set(found) == {*DAEMONS, "circus-migrate", "circus-agent", "circus-worker"}
    for name, unit in found.items():
        service = unit["Service"]
        assert {key: service.get(key) for key in hardening} == hardening, name
        assert service["User"] not in ("root", ""), name
        if name != "circus-migrate":
            assert service["Restart"] == "on-failure", name
            # SIGTERM to the daemon alone: it drains or hands back its builds itself
            assert service["KillMode"] == "mixed", name
    for name in DAEMONS:
        assert "circus-migrate.service" in found[name]["Unit"]["Requires"].split()
        assert "circus-migrate.service" in found[name]["Unit"]["After"].split()


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    # the units as installed, but with a program that exists here; the units they
    # order themselves after are stand-ins
    for path in UNITS.glob("*.service"):
        text = path.read_text()
        for line in text.splitlines():
            if line.startswith("ExecStart="):
                text = text.replace(line, "ExecStart=/bin/true")
        (tmp_path / path.name).write_text(text)
    for other in ("nix-daemon", "postgresql", "redis-server"):
        (tmp_path / f"{other}.service").write_text("[Service]\nExecStart=/bin/true\n")
    verified = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *sorted(p.name for p in UNITS.glob("*.service"))],
        cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "SYSTEMD_UNIT_PATH": f"{tmp_path}:"},
        capture_output=True, text=True, timeout=60)
    assert verified.returncode == 0, verified.stderr
    assert verified.stderr.strip() == "", verified.stderr
