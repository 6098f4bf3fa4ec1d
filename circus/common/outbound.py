"""The one guarded outbound HTTP client: requests to URLs that users choose.

Project maintainers choose where notifications go (webhook and Slack URLs, a
forge's API URL). Without a guard that is a server-side request forgery: the
server would POST to its own loopback services, the private network, or the
cloud metadata endpoint, and report the answer back in the delivery error.

So every request made here:

- resolves the host name, and refuses the request if *any* address it resolves
  to is not a public unicast address (loopback, RFC 1918 and ULA private,
  link-local, the metadata endpoints 169.254.169.254 and fd00:ec2::254, CGNAT,
  unspecified, multicast, reserved) — unless the host name or the address is in
  ``server.outbound_allowlist`` (host names, IP addresses or CIDR networks);
- connects to exactly the address it checked (the TLS handshake still names and
  verifies the host name), so a DNS answer that changes between the check and
  the connection (DNS rebinding) cannot redirect it;
- is checked again on every call (a name that resolved to a public address when
  the config was saved may not any more);
- never follows redirects (a 3xx is an answer like any other), reads at most
  ``MAX_RESPONSE_BYTES`` of the answer, and ignores proxy environment variables.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

import certifi
import urllib3
from urllib3.util import make_headers

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: answers are only ever quoted in errors: a few KiB is plenty
MAX_RESPONSE_BYTES = 64 * 1024
#: cloud metadata endpoints, named for the error message (both are non-global anyway)
METADATA = frozenset({ipaddress.ip_address("169.254.169.254"),
                      ipaddress.ip_address("fd00:ec2::254")})


class OutboundError(Exception):
    """The request could not be made (refused destination, network error, timeout)."""

    def __init__(self, message: str, *, refused: bool = False, timeout: bool = False) -> None:
        super().__init__(message)
        #: the destination is not allowed: retrying cannot help
        self.refused = refused
        self.timeout = timeout


@dataclass(frozen=True)
class Response:
    status: int
    headers: Mapping[str, str]
    #: at most MAX_RESPONSE_BYTES of the body
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")


@dataclass(frozen=True)
class Allowlist:
    """``server.outbound_allowlist``: host names (exact, case-insensitive) and networks."""

    hosts: frozenset[str] = frozenset()
    networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def parse(cls, entries: Iterable[str]) -> Allowlist:
        hosts, networks = set(), []
        for entry in entries:
            network = parse_network(entry)
            if network is None:
                hosts.add(entry.strip().lower().rstrip("."))
            else:
                networks.append(network)
        return cls(frozenset(hosts), tuple(networks))

    def allows_host(self, host: str) -> bool:
        return host.lower().rstrip(".") in self.hosts

    def allows_address(self, address: IPAddress) -> bool:
        return any(address in network for network in self.networks)


def parse_network(entry: str) -> IPNetwork | None:
    """An IP address or CIDR network, else ``None`` (then it is a host name)."""
    try:
        return ipaddress.ip_network(entry.strip(), strict=False)
    except ValueError:
        return None


def entry_problem(entry: str) -> str | None:
    """Why an allowlist entry is neither a network nor a plausible host name."""
    if parse_network(entry) is not None:
        return None
    host = entry.strip().rstrip(".")
    labels = host.split(".")
    if not host or len(host) > 253 or not all(
            label and len(label) <= 63 and label.replace("-", "").replace("_", "").isalnum()
            for label in labels):
        return f"not a host name, IP address or CIDR network: {entry!r}"
    return None


#: IPv6 prefixes that carry an IPv4 address a gateway may deliver to (NAT64)
NAT64 = ipaddress.ip_network("64:ff9b::/96")


def embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one stands for (mapped, NAT64, 6to4), if any."""
    if not isinstance(address, ipaddress.IPv6Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address.sixtofour


def is_public(address: IPAddress) -> bool:
    """A public unicast address (what a user-chosen URL may reach without the allowlist)."""
    inner = embedded_ipv4(address)
    if inner is not None and not is_public(inner):
        return False
    return address.is_global and not address.is_multicast and address not in METADATA


def describe(address: IPAddress) -> str:
    inner = embedded_ipv4(address)
    if inner is not None and not is_public(inner):
        return describe(inner)
    if address in METADATA:
        return "a cloud metadata address"
    for attribute, label in (("is_loopback", "a loopback"), ("is_link_local", "a link-local"),
                             ("is_multicast", "a multicast"), ("is_unspecified", "an unspecified"),
                             ("is_private", "a private")):
        if getattr(address, attribute):
            return f"{label} address"
    return "a non-public address"


def resolve(host: str, port: int) -> list[IPAddress]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise OutboundError(f"cannot resolve {host} ({exc})") from None
    found: list[IPAddress] = []
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).partition("%")[0])
        if address not in found:
            found.append(address)
    if not found:
        raise OutboundError(f"{host} has no address")
    return found


def checked_addresses(host: str, port: int, allowlist: Allowlist) -> list[IPAddress]:
    """The addresses to connect to; raises when any of them is not allowed."""
    addresses = resolve(host, port)
    if allowlist.allows_host(host):
        return addresses
    for address in addresses:
        if not is_public(address) and not allowlist.allows_address(address):
            raise OutboundError(
                f"refused: {host} resolves to {describe(address)} ({address}); add it to "
                "server.outbound_allowlist to allow it", refused=True)
    return addresses


def post(url: str, *, allowlist: Allowlist, timeout: float, body: bytes,
         headers: Mapping[str, str]) -> Response:
    """POST ``body`` to ``url`` through the guard (see the module docstring)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise OutboundError("only http(s) URLs with a host are allowed", refused=True)
    host = parts.hostname
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise OutboundError("the URL's port is not a number", refused=True) from None
    addresses = checked_addresses(host, port, allowlist)
    default_port = port == (443 if parts.scheme == "https" else 80)
    host_header = (f"[{host}]" if ":" in host else host) + ("" if default_port else f":{port}")
    send = {"Host": host_header, **headers}
    if parts.username is not None:
        send.update(make_headers(basic_auth=f"{parts.username}:{parts.password or ''}"))
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    last: OutboundError | None = None
    for address in addresses:
        try:
            return _send(parts.scheme, host, str(address), port, target, body, send, timeout)
        except urllib3.exceptions.TimeoutError:
            last = OutboundError(f"no answer from {host} within {timeout} s", timeout=True)
        except urllib3.exceptions.HTTPError as exc:
            last = OutboundError(f"request to {host} failed ({type(exc).__name__})")
    assert last is not None
    raise last


def _send(scheme: str, host: str, address: str, port: int, target: str, body: bytes,
          headers: Mapping[str, str], timeout: float) -> Response:
    options: dict[str, object] = {"timeout": urllib3.Timeout(total=timeout), "retries": False,
                                  "maxsize": 1}
    pool: urllib3.HTTPConnectionPool
    if scheme == "https":
        # connect to the checked address, but send SNI and verify the certificate
        # for the host name, exactly as if the name had been used
        pool = urllib3.HTTPSConnectionPool(address, port, server_hostname=host,
                                           assert_hostname=host, cert_reqs="CERT_REQUIRED",
                                           ca_certs=certifi.where(), **options)  # type: ignore[arg-type]
    else:
        pool = urllib3.HTTPConnectionPool(address, port, **options)  # type: ignore[arg-type]
    with pool:
        response = pool.urlopen("POST", target, body=body, headers=dict(headers),
                                redirect=False, assert_same_host=False, preload_content=False)
        try:
            data = response.read(MAX_RESPONSE_BYTES)
        finally:
            response.release_conn()
            response.close()
    return Response(response.status, response.headers, data)
