"""Network namespaces as test "hosts": their own IP, a link that can be cut, their own /nix.

A host is a network namespace joined to the main namespace by a veth pair on a
/30 subnet of ``10.231.0.0/16``::

    main namespace                         host namespace "circus-<pid>-<index>"
    cv<index>  10.231.x.y+1/30   <--veth-->  cvh<index>  10.231.x.y+2/30
                                             lo up, default route via 10.231.x.y+1

Usage (the whole API)::

    with network_host(nix_store=tmp_path / "store") as host:
        daemon = Daemon("worker", host.command([...argv...]), tmp_path).start()
        # the host reaches the main namespace at host.main_address (services there
        # must listen on 0.0.0.0 or on host.main_address; 127.0.0.1 is the host's own
        # loopback), and the main namespace reaches the host at host.address
        host.cut()       # link down: packets are lost both ways, open sockets hang
        host.restore()   # link up again, routes back

Every process started through ``host.command``/``host.run`` runs in the host's
network namespace and, when ``nix_store`` is given, in a private mount namespace
where that directory is bind-mounted on ``/nix`` (its own, initially empty store:
paths really have to travel). Unix sockets are files, not network: a host can
still reach them through the filesystem, so shared-nothing tests must give their
hosts TCP URLs only.

Names are unique per process and per host (several pytest runs and xdist workers
share the machine): the subnet index is claimed by creating the veth pair, which
fails when another run holds it. The namespace is deleted on exit, even after a
failure; namespaces left by a test process that died (kill -9) are swept when the
next host is made.
"""

from __future__ import annotations

import os
import random
import re
import shlex
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.helpers.daemons import Daemon

#: subnets are /30s of this /16: 16384 hosts at most
SUBNET_PREFIX = "10.231"
SUBNETS = 16384
NAMESPACE_PREFIX = "circus-"
_NAMESPACE = re.compile(rf"^{NAMESPACE_PREFIX}(\d+)-(\d+)\b")


def _ip(*args: str, namespace: str | None = None) -> subprocess.CompletedProcess[str]:
    argv = ["ip", *(["-n", namespace] if namespace else []), *args]
    return subprocess.run(argv, capture_output=True, text=True, check=False)


def _checked(*args: str, namespace: str | None = None) -> None:
    done = _ip(*args, namespace=namespace)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {done.stderr.strip()}")


def _address(index: int, offset: int) -> str:
    value = index * 4 + offset
    return f"{SUBNET_PREFIX}.{value >> 8}.{value & 255}"


def sweep_stale_namespaces() -> list[str]:
    """Delete the namespaces of test processes that no longer exist; returns their names."""
    swept = []
    for line in _ip("netns", "list").stdout.splitlines():
        match = _NAMESPACE.match(line)
        if match is None:
            continue
        try:
            os.kill(int(match.group(1)), 0)
            continue
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        name = line.split()[0]
        _ip("netns", "delete", name)
        swept.append(name)
    return swept


@dataclass
class NetnsHost:
    """One host: see the module docstring. Made by :func:`network_host`."""

    #: the network namespace's name (``ip netns exec <name> ...``)
    name: str
    #: the host's own address (the main namespace reaches it here)
    address: str
    #: the main namespace's end of the link (the host reaches services here)
    main_address: str
    #: the veth device in the main namespace (``cut``/``restore`` switch it)
    device: str
    #: bind-mounted on ``/nix`` for every process of the host, or None (the shared /nix)
    nix_store: Path | None = None

    def command(self, argv: Sequence[str]) -> list[str]:
        """The argv that runs ``argv`` on this host (exec'd: the pid is the process's own)."""
        inner = ["ip", "netns", "exec", self.name]
        if self.nix_store is None:
            return [*inner, *argv]
        script = f"mount --bind {shlex.quote(str(self.nix_store))} /nix && exec \"$@\""
        return [*inner, "unshare", "--mount", "--propagation", "private",
                "sh", "-c", script, "sh", *argv]

    def run(self, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        """``subprocess.run`` of ``argv`` on this host (keyword arguments passed on)."""
        return subprocess.run(self.command(argv), check=kwargs.pop("check", False), **kwargs)

    def daemon(self, name: str, argv: Sequence[str], log_dir: Path,
               env: Mapping[str, str] | None = None) -> Daemon:
        """A :class:`Daemon` (not started) running ``argv`` on this host."""
        return Daemon(name, self.command(argv), log_dir, env=env)

    def pids(self) -> list[int]:
        """The processes running in the host's network namespace."""
        return [int(p) for p in _ip("netns", "pids", self.name).stdout.split()]

    @property
    def subnet(self) -> str:
        """The link's /30 (``10.231.x.y/30``)."""
        head, last = self.main_address.rsplit(".", 1)
        return f"{head}.{int(last) - 1}/30"

    def cut(self) -> None:
        """Pull the cable: the link goes down and packets to the host vanish.

        Open connections stay open and hang (retransmitting) until ``restore``
        or their own timeouts; a new connection from the main namespace fails
        at once (``EINVAL``). The blackhole route keeps packets for the host
        from leaking out of the machine's default route while the link is down.
        """
        _checked("link", "set", self.device, "down")
        _checked("route", "replace", "blackhole", self.subnet)

    def restore(self) -> None:
        """Plug it back in (the routes of both ends come back with the link)."""
        _ip("route", "del", "blackhole", self.subnet)
        _checked("link", "set", self.device, "up")
        # the kernel drops a route whose gateway became unreachable while the link was down
        _ip("route", "replace", "default", "via", self.main_address, namespace=self.name)


def _claim_subnet(namespace: str) -> tuple[int, str]:
    """Create a veth pair on a free subnet index; returns the index and main device."""
    start = random.randrange(SUBNETS)
    for step in range(SUBNETS):
        index = (start + step) % SUBNETS
        device = f"cv{index}"
        done = _ip("link", "add", device, "type", "veth", "peer", "name", f"cvh{index}",
                   "netns", namespace)
        if done.returncode == 0:
            return index, device
        if "exists" not in done.stderr:
            raise RuntimeError(f"cannot create a veth pair: {done.stderr.strip()}")
    raise RuntimeError("no free subnet for a network namespace host")


@contextmanager
def network_host(nix_store: Path | None = None) -> Iterator[NetnsHost]:
    """Make a host (see the module docstring); deleted on exit.

    ``nix_store``: a directory (created when missing) mounted on ``/nix`` for
    the host's processes.
    """
    sweep_stale_namespaces()
    namespace = f"{NAMESPACE_PREFIX}{os.getpid()}-{random.randrange(1 << 30)}"
    _checked("netns", "add", namespace)
    index: int | None = None
    try:
        index, device = _claim_subnet(namespace)
        main, own = _address(index, 1), _address(index, 2)
        host = NetnsHost(namespace, own, main, device, nix_store)
        # a test process killed while its host was cut left this behind
        _ip("route", "del", "blackhole", host.subnet)
        _checked("addr", "add", f"{main}/30", "dev", device)
        _checked("link", "set", device, "up")
        _checked("link", "set", "lo", "up", namespace=namespace)
        _checked("addr", "add", f"{own}/30", "dev", f"cvh{index}", namespace=namespace)
        _checked("link", "set", f"cvh{index}", "up", namespace=namespace)
        _checked("route", "add", "default", "via", main, namespace=namespace)
        if nix_store is not None:
            nix_store.mkdir(parents=True, exist_ok=True)
        yield host
    finally:
        if index is not None:
            # deleting one end deletes the pair at once; left to the namespace's
            # deletion, the kernel removes it a moment later
            _ip("link", "del", f"cv{index}")
        _ip("netns", "delete", namespace)
        if index is not None:
            _ip("route", "del", "blackhole", NetnsHost("", "", _address(index, 1), "").subnet)
