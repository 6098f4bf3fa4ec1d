"""The network-namespace host helper, with real processes talking TCP across the link."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.daemons import wait_until
from tests.helpers.net import free_port
from tests.helpers.netns import network_host, sweep_stale_namespaces

ECHO_SERVER = """
import socket, sys
server = socket.create_server(("0.0.0.0", int(sys.argv[1])))
print("listening", flush=True)
while True:
    conn, peer = server.accept()
    with conn:
        conn.sendall(f"{peer[0]} says {conn.recv(100).decode()}".encode())
"""


def ask(host: str, port: int, message: str, timeout: float = 2.0) -> str:
    with socket.create_connection((host, port), timeout=timeout) as conn:
        conn.sendall(message.encode())
        return conn.recv(200).decode()


def namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def test_a_host_and_the_main_namespace_talk_over_the_link_which_can_be_cut(
        tmp_path: Path) -> None:
    port = free_port()
    with network_host() as host:
        server = host.daemon("echo", [sys.executable, "-c", ECHO_SERVER, str(port)], tmp_path)
        with server:
            wait_until(lambda: "listening" in server.log(), timeout=20, message="echo up")
            # main → host: the server sees the main namespace's end of the link
            assert ask(host.address, port, "hello") == f"{host.main_address} says hello"
            # the host's loopback is its own: nothing listens on the main side's port
            with pytest.raises(ConnectionRefusedError):
                ask("127.0.0.1", port, "hello")
            # an open connection hangs while the link is cut, and goes on after
            held = socket.create_connection((host.address, port), timeout=10)
            host.cut()
            held.sendall(b"held")
            held.settimeout(1.5)
            with pytest.raises(TimeoutError):
                held.recv(100)
            with pytest.raises(OSError, match=r"Invalid argument|unreachable|timed out"):
                ask(host.address, port, "lost", timeout=1.5)
            host.restore()
            held.settimeout(20)
            assert held.recv(100).decode() == f"{host.main_address} says held"
            held.close()
            assert ask(host.address, port, "back") == f"{host.main_address} says back"
            assert host.pids() == [server.pid]
        assert host.pids() == []
        name = host.name
        assert name in namespaces()
    assert name not in namespaces()
    devices = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert f" {host.device}@" not in devices


def test_a_host_reaches_a_main_namespace_server_and_has_its_own_nix(tmp_path: Path) -> None:
    port = free_port()
    listener = socket.create_server(("0.0.0.0", port))
    listener.settimeout(20)
    client = ("import socket, sys; c = socket.create_connection((sys.argv[1], int(sys.argv[2])),"
              " timeout=5); print(c.recv(100).decode())")
    with network_host(nix_store=tmp_path / "store") as first, network_host() as second:
        assert first.address != second.address
        for host in (first, second):
            done = subprocess.Popen(host.command([sys.executable, "-c", client,
                                                  host.main_address, str(port)]),
                                    stdout=subprocess.PIPE, text=True)
            conn, peer = listener.accept()
            with conn:
                conn.sendall(f"you are {peer[0]}".encode())
            out, _ = done.communicate(timeout=20)
            assert out.strip() == f"you are {host.address}"
        # the first host's /nix is the directory given, not the machine's
        marker = f"/nix/circus-netns-test-{port}"
        assert first.run(["sh", "-c", f"echo here > {marker}"]).returncode == 0
        assert (tmp_path / "store" / marker.removeprefix("/nix/")).read_text() == "here\n"
        assert not Path(marker).exists()
        assert second.run(["test", "-e", marker]).returncode != 0
    listener.close()


def test_the_namespace_is_deleted_after_a_failure_and_stale_ones_are_swept() -> None:
    names = []

    def fail_inside() -> None:
        with network_host() as host:
            names.append(host.name)
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fail_inside()
    name = names[0]
    assert name not in namespaces()
    # a namespace of a test process that died (pid 2**22 + 1 is above pid_max's default)
    stale = f"circus-{2**22 + 1}-7"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    try:
        assert stale in sweep_stale_namespaces()
        assert stale not in namespaces()
    finally:
        subprocess.run(["ip", "netns", "delete", stale], capture_output=True)
