"""Where evaluation may fetch from: git remotes and the inputs a flake locks.

Whoever may create a project chooses its repository URL and its git inputs, and
a repository's ``flake.lock`` chooses where Nix fetches the flake's inputs from.
The evaluator fetches with its own network position and its own SSH identity,
so, unchecked, ``http://127.0.0.1:…``, ``http://169.254.169.254/…`` or
``ssh://git@internal/private.git`` would make it a door into the private
network (and an evaluation's errors would quote what it found).

So the rule of the guarded outbound client (:mod:`circus.common.outbound`)
applies here too, on every fetch (a name may resolve elsewhere than when the
URL was saved):

- the remote's host is resolved and refused if any address is not public
  (loopback, private, link-local, metadata, CGNAT, unspecified, ...), unless
  the host name or the address is in ``server.outbound_allowlist``;
- git then connects to exactly the address that was checked, never looking the
  name up again (DNS rebinding): http(s) through curl's resolve list (the TLS
  certificate is still checked for the name; needs git >= 2.37), ssh through
  ``HostName`` with the host key looked up under the original name
  (``HostKeyAlias``), ``git://`` (no TLS, no host key: nothing ties it to the
  name) by putting the address into the URL;
- http(s) redirects are not followed (a public URL answering "302 Location:
  http://127.0.0.1/" would otherwise lead git around the check).

An allow-listed *host name* is the admin's own: git resolves it itself, so
aliases of the evaluator's ``~/.ssh/config`` keep working. Local repositories
(``file://``, paths) have their own rule (:mod:`circus.common.localsource`) and
are not touched here. Submodules are never fetched (mirrors are bare, trees
come from ``git archive``, flakes are fetched without ``submodules``).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import shlex
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from circus.common import outbound
from circus.common.outbound import Allowlist, IPAddress, OutboundError

log = logging.getLogger(__name__)

#: characters no host part of a URL needs
_AMBIGUOUS = re.compile(r"[\\\s\x00-\x1f\x7f]")

DEFAULT_PORTS = {"http": 80, "https": 443, "ssh": 22, "git": 9418}


@dataclass(frozen=True)
class Remote:
    """The host a git URL makes git connect to."""

    scheme: str
    host: str
    port: int


def remote_of(url: str, scheme: str) -> Remote | None:
    """The remote of a normalised git ``url`` whose transport is ``scheme``
    (:func:`circus.evaluator.git.url_scheme`); None for local repositories."""
    if scheme not in DEFAULT_PORTS:
        return None
    if "://" in url:
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            raise OutboundError(f"{url!r} is not a valid URL (host or port)",
                                refused=True) from None
        netloc, host = parts.netloc, parts.hostname
    else:
        # scp-like [user@]host:path
        netloc = url.split(":", 1)[0]
        host, port = netloc.rpartition("@")[2].lower(), None
    if _AMBIGUOUS.search(netloc):
        # where parsers could disagree on the host (backslashes, spaces, controls),
        # the one that connects must not see another host than the one checked
        raise OutboundError(f"{url!r} is not a valid URL (host part)", refused=True)
    if not host:
        raise OutboundError(f"{url!r} names no host", refused=True)
    return Remote(scheme, host, port or DEFAULT_PORTS[scheme])


def _literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def checked_addresses(remote: Remote, allowlist: Allowlist) -> list[IPAddress] | None:
    """The addresses git must connect to (None: let git resolve the name itself, which
    the allowlist names); raises :class:`OutboundError` when the rule refuses."""
    if allowlist.allows_host(remote.host):
        return None
    return outbound.checked_addresses(remote.host, remote.port, allowlist)


@dataclass(frozen=True)
class PinnedRemote:
    """How to run git so it reaches the checked address and nothing else."""

    #: the URL to give git (``git://``: the checked address instead of the name)
    url: str
    #: git configuration (``-c``), passed as GIT_CONFIG_COUNT/KEY/VALUE
    config: tuple[tuple[str, str], ...] = ()
    #: replaces the ssh command git runs
    ssh_command: str | None = None

    def environ(self, base: Mapping[str, str]) -> dict[str, str]:
        env = dict(base)
        if self.config:
            # after the deployment's own GIT_CONFIG_* entries: the last value wins
            count = env.get("GIT_CONFIG_COUNT", "")
            first = int(count) if count.isdigit() else 0
            env["GIT_CONFIG_COUNT"] = str(first + len(self.config))
            for index, (key, value) in enumerate(self.config, start=first):
                env[f"GIT_CONFIG_KEY_{index}"] = key
                env[f"GIT_CONFIG_VALUE_{index}"] = value
        if self.ssh_command is not None:
            env["GIT_SSH_COMMAND"] = self.ssh_command
        return env


def _bracketed(address: IPAddress) -> str:
    return f"[{address}]" if address.version == 6 else str(address)


def pin(url: str, scheme: str, allowlist: Allowlist, ssh_command: str) -> PinnedRemote:
    """Check the remote of ``url`` and say how git reaches exactly the checked address.

    ``ssh_command``: the ssh command git would otherwise run (``GIT_SSH_COMMAND``).
    Raises :class:`OutboundError` (``refused`` for a destination the rule forbids).
    """
    remote = remote_of(url, scheme)
    if remote is None:
        return PinnedRemote(url)
    addresses = checked_addresses(remote, allowlist)
    # an IP literal is its own address: nothing to look up again
    pinned = addresses if addresses is not None and _literal(remote.host) is None else None
    if remote.scheme in ("http", "https"):
        config: list[tuple[str, str]] = [("http.followRedirects", "false")]
        if pinned:
            resolve = ",".join(_bracketed(a) for a in pinned)
            config.append(("http.curloptResolve", f"{remote.host}:{remote.port}:{resolve}"))
        return PinnedRemote(url, tuple(config))
    if not pinned:
        return PinnedRemote(url)
    address = pinned[0]
    if remote.scheme == "ssh":
        alias = remote.host if remote.port == 22 else f"[{remote.host}]:{remote.port}"
        return PinnedRemote(url, ssh_command=(
            f"{ssh_command} -o HostName={address} -o HostKeyAlias={shlex.quote(alias)}"))
    # git://host[:port]/path: the daemon protocol has no identity to keep for the name
    parts = urlsplit(url)
    netloc = _bracketed(address) + (f":{parts.port}" if parts.port else "")
    return PinnedRemote(urlunsplit(parts._replace(netloc=netloc)))


# ---------------------------------------------------------------------------
# the inputs a flake locks


#: hosts of the flake input types that name a forge rather than a URL
FORGE_HOSTS = {"github": "github.com", "gitlab": "gitlab.com", "sourcehut": "git.sr.ht"}


def _input_urls(node: Mapping[str, Any]) -> Iterator[str]:
    """The URLs (``scheme://host...``) one locked flake input makes Nix fetch from."""
    for key in ("locked", "original"):
        attrs = node.get(key)
        if not isinstance(attrs, Mapping):
            continue
        kind = str(attrs.get("type", ""))
        if kind in FORGE_HOSTS:
            yield f"https://{attrs.get('host') or FORGE_HOSTS[kind]}/"
        elif isinstance(attrs.get("url"), str):
            yield str(attrs["url"])


def flake_input_problems(lock_text: str, allowlist: Allowlist) -> list[str]:
    """Why the inputs a ``flake.lock`` names may not be fetched (empty: they may).

    Checked before Nix runs, with the rule of git remotes: an input on a
    non-public address is refused unless allow-listed. A name that does not
    resolve is left to Nix (a locked input already in the store needs no
    network). Nix's own ``allowed-uris`` check follows when it fetches.
    """
    try:
        nodes = json.loads(lock_text).get("nodes", {})
    except (ValueError, AttributeError):
        return []  # Nix reports a broken lock file better than we could
    if not isinstance(nodes, Mapping):
        return []
    problems: list[str] = []
    verdicts: dict[Remote, str | None] = {}
    for name, node in sorted(nodes.items()):
        if not isinstance(node, Mapping):
            continue
        for url in dict.fromkeys(_input_urls(node)):
            problem = _url_problem(url, allowlist, verdicts)
            if problem:
                problems.append(f"flake input {name!r} ({url}): {problem}")
                break
    return problems


def _url_problem(url: str, allowlist: Allowlist, verdicts: dict[Remote, str | None]
                 ) -> str | None:
    """Why Nix may not fetch ``url`` (a flake input's), or None; ``verdicts`` caches
    one lookup per host and port."""
    try:
        remote = _transport_remote(url)
        if remote is None:
            return None  # file:// and paths: restricted mode allows only the flake itself
        if remote not in verdicts:
            verdicts[remote] = None
            try:
                checked_addresses(remote, allowlist)
            except OutboundError as exc:
                if exc.refused:
                    verdicts[remote] = str(exc)
        return verdicts[remote]
    except OutboundError as exc:
        return str(exc)
    except ValueError:
        return "not a valid URL"


# ---------------------------------------------------------------------------
# evaluator.allowed_uris: the prefixes Nix code may fetch under in restricted mode


def _transport_remote(url: str) -> Remote | None:
    """The remote a URL as Nix writes it names (``git+https``, ``tarball+http``,
    ``file+https``: the transport follows the "+"); None: no network transport."""
    try:
        _, plus, scheme = urlsplit(url).scheme.lower().rpartition("+")
    except ValueError:
        raise OutboundError(f"{url!r} is not a valid URL", refused=True) from None
    return remote_of(url.split("+", 1)[1] if plus else url, scheme)


def _prefix_remote(prefix: str) -> Remote | None:
    """The remote an ``allowed-uris`` prefix names (None: no network transport)."""
    return _transport_remote(prefix) if "://" in prefix else None


def permitted_uris(prefixes: Sequence[str], allowlist: Allowlist) -> list[str]:
    """The ``evaluator.allowed_uris`` entries whose host passes the rule now.

    Checked per evaluation (one lookup per host), like git remotes: a prefix whose
    host resolves to a non-public address that ``server.outbound_allowlist`` does
    not name is left out, so Nix refuses URIs under it ("forbidden in restricted
    mode"). A name that does not resolve stays (Nix cannot reach it either).
    """
    permitted: list[str] = []
    verdicts: dict[Remote, bool] = {}
    for prefix in prefixes:
        try:
            remote = _prefix_remote(prefix)
        except OutboundError:
            continue  # no host: refused when the settings were loaded
        if remote is not None and remote not in verdicts:
            try:
                checked_addresses(remote, allowlist)
                verdicts[remote] = True
            except OutboundError as exc:
                verdicts[remote] = not exc.refused
                if exc.refused:
                    log.warning("evaluator.allowed_uris entry %s left out: %s", prefix, exc)
        if remote is None or verdicts[remote]:
            permitted.append(prefix)
    return permitted
