"""Parsing ``ssh_uri``, ``public_host_key`` and what the build wrapper prints."""

from __future__ import annotations

import base64
import os
import shlex
import subprocess
from pathlib import Path

import pytest

from circus.queue_runner.ssh.connection import remote_nix_config, remote_prelude
from circus.queue_runner.ssh.hosts import (
    HostKeyFormatError,
    SshTarget,
    parse_host_keys,
    parse_ssh_uri,
)
from circus.queue_runner.ssh.remotebuild import IMPORT_FAILED, ScriptReport, build_script
from tests.ssh_builders.conftest import keygen


@pytest.mark.parametrize(("uri", "expected"), [
    ("builder.example.org", SshTarget("builder.example.org", 22, None)),
    ("nix@builder", SshTarget("builder", 22, "nix")),
    ("ssh://nix@builder:2222", SshTarget("builder", 2222, "nix")),
    ("ssh-ng://root@10.0.0.5", SshTarget("10.0.0.5", 22, "root")),
    ("ssh://nix@[fd00::1]:22", SshTarget("fd00::1", 22, "nix")),
])
def test_ssh_uris(uri: str, expected: SshTarget) -> None:
    assert parse_ssh_uri(uri) == expected


@pytest.mark.parametrize("uri", ["http://builder", "ssh://", "ssh://nix@b:99999",
                                 "ssh://nix@b/path", "ssh://b?x=1"])
def test_bad_ssh_uris(uri: str) -> None:
    with pytest.raises(ValueError, match="invalid ssh_uri"):
        parse_ssh_uri(uri)


def test_known_hosts_names_follow_openssh() -> None:
    assert SshTarget("b", 22, None).known_hosts_names()[0] == "b"
    assert SshTarget("b", 2222, None).known_hosts_names()[0] == "[b]:2222"


def test_host_key_forms(tmp_path: Path) -> None:
    line = keygen(tmp_path / "k1", "comment with spaces")
    key_type, blob = line.split()[:2]
    fingerprint = parse_host_keys(line)[0].fingerprint
    expected = subprocess.run(["ssh-keygen", "-l", "-f", str(tmp_path / "k1.pub")],
                              capture_output=True, text=True, check=True).stdout.split()[1]
    assert fingerprint == expected
    forms = [
        f"{key_type} {blob}",                                   # bare
        f"builder,10.0.0.5 {key_type} {blob}",                  # known_hosts
        f"[builder]:2222 {key_type} {blob} trailing comment",   # known_hosts with a port
        f"|1|abc=|def= {key_type} {blob}",                      # hashed known_hosts
        base64.b64encode(f"{key_type} {blob}".encode()).decode(),  # Hydra machines file
    ]
    for form in forms:
        assert [k.fingerprint for k in parse_host_keys(form)] == [fingerprint], form
    second = keygen(tmp_path / "k2")
    keys = parse_host_keys(f"# two keys\n{line}\n\n@revoked b {second}\n{second}\n")
    assert len(keys) == 2


@pytest.mark.parametrize(("text", "reason"), [
    ("", "no key found"),
    ("builder.example.org", "expected 'type base64-key'"),
    ("ssh-ed25519", "no key"),
    ("ssh-ed25519 !!!notbase64", "invalid ssh-ed25519 key"),
    ("ssh-ed25519 AAAAC3NzaC1yc2EAAAADAQABAAABAQ==", "invalid ssh-ed25519 key"),
    ("@cert-authority *.example.org ssh-ed25519 AAAA", "not supported"),
    # not ASCII: base64 raises ValueError, not binascii.Error (a 500 the API fuzzer found)
    ("\u00e9t\u00e9\u00bc", "expected 'type base64-key'"),
])
def test_bad_host_keys(text: str, reason: str) -> None:
    with pytest.raises(HostKeyFormatError, match=reason):
        parse_host_keys(text)


def test_remote_environment_is_quoted() -> None:
    config = remote_nix_config([], None, {"build-users-group": "", "cores": "2"})
    assert config.splitlines() == ["substituters = ", "build-users-group = ", "cores = 2"]
    prelude = remote_prelude("/run/current-system/sw/bin:/usr/bin", config)
    done = subprocess.run(["sh", "-c", f"{prelude}\nprintf %s \"$NIX_CONFIG\""],
                          capture_output=True, text=True, check=True)
    assert done.stdout == config


def report_of(stderr: bytes) -> ScriptReport:
    report = ScriptReport()
    for line in stderr.splitlines():
        if line.startswith(b"circus:"):
            report.read(line)
    return report


def test_wrapper_imports_builds_exports_and_stops_on_eof(tmp_path: Path) -> None:
    """The wrapper's shell logic, with a stand-in for nix-store: inputs arrive on stdin,
    the outputs leave on stdout after a success, the exit status and the OOM counter
    are reported, and EOF on stdin stops the build."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nix-store").write_text(
        "#!/bin/sh\n"
        "case \"$1\" in\n"
        "  --import) read -r line; [ \"$line\" = bad ] && exit 1; echo \"got $line\" >&2;;\n"
        "  --export) shift; echo \"stream of $*\";;\n"
        "  *) echo building >&2; exec sleep \"$3\";;\n"
        "esac\n")
    (fake / "nix-store").chmod(0o755)
    env = f"PATH={shlex.quote(str(fake))}:/usr/bin:/bin"

    def start(seconds: int, inputs: bytes | None = None
              ) -> tuple[subprocess.Popen[bytes], int]:
        script = build_script(["nix-store", "--realise", "x.drv", str(seconds)],
                              ["/nix/store/bbb-out"], import_inputs=inputs is not None)
        read_end, write_end = os.pipe()
        process = subprocess.Popen(["sh", "-c", f"export {env}\n{script}"], stdin=read_end,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        os.close(read_end)
        if inputs is not None:
            os.write(write_end, inputs)
        return process, write_end

    quick, switch = start(0, b"payload\n")
    out, err = quick.communicate(timeout=30)
    os.close(switch)
    assert quick.returncode == 0
    assert out == b"stream of /nix/store/bbb-out\n"
    report = report_of(err)
    assert report.exit_code == 0
    assert report.oom_kills == 0
    assert b"got payload" in err
    assert b"building" in err
    refused, switch = start(0, b"bad\n")
    out, err = refused.communicate(timeout=30)
    os.close(switch)
    assert refused.returncode == IMPORT_FAILED
    assert report_of(err).import_failed
    assert b"building" not in err
    slow, switch = start(60)
    os.close(switch)  # EOF: what a closed channel or a lost connection looks like
    out, err = slow.communicate(timeout=20)
    assert report_of(err).exit_code == 143  # SIGTERM
    assert out == b""
