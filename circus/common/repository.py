"""Repository URLs as forges name them: ``owner/name`` on a host.

Used where Circus talks to a forge about a project's repository (commit
statuses) and where a forge's identity must match a project (OIDC agents).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit


class RepositoryUrlError(ValueError):
    """The URL does not name a repository on a forge."""


@dataclass(frozen=True)
class Repository:
    """Where a repository lives: ``scheme://host`` (when known) and its path on the forge."""

    scheme: str | None
    host: str | None
    #: ``owner/name`` (GitLab: ``group/subgroup/name``)
    path: str

    @property
    def web_base(self) -> str | None:
        """``https://host`` of the forge (for Gitea/Forgejo API URLs)."""
        if self.host is None:
            return None
        return f"{self.scheme if self.scheme in ('http', 'https') else 'https'}://{self.host}"

    def owner_and_name(self) -> tuple[str, str]:
        parts = self.path.split("/")
        if len(parts) != 2 or not all(parts):
            raise RepositoryUrlError(f"repository {self.path!r} is not owner/name")
        return parts[0], parts[1]


_SCP = re.compile(r"^(?:[^@/]+@)?(?P<host>[^:/]+):(?P<path>[^/].*)$")
_SHORTHANDS = {"github": "github.com", "gitlab": "gitlab.com", "sourcehut": "git.sr.ht"}


def parse_repository(url: str) -> Repository:
    """``https://host/o/n(.git)``, ``git+https://…``, ``ssh://git@host/o/n``,
    ``git@host:o/n.git``, ``github:o/n`` → :class:`Repository`."""
    text = url.strip()
    if text.startswith("git+"):
        text = text[4:]
    scheme, sep, rest = text.partition(":")
    if sep and scheme in _SHORTHANDS and not rest.startswith("//"):
        path = rest.split("?", 1)[0].strip("/")
        return Repository("https", _SHORTHANDS[scheme], _clean(path))
    if "://" in text:
        parts = urlsplit(text)
        host = parts.hostname
        if host is None:
            raise RepositoryUrlError(f"cannot tell the forge from repository URL {url!r}")
        if parts.port and parts.scheme in ("http", "https"):
            host = f"{host}:{parts.port}"
        return Repository(parts.scheme, host, _clean(parts.path))
    match = _SCP.match(text)
    if match:
        return Repository("ssh", match["host"], _clean(match["path"]))
    raise RepositoryUrlError(f"cannot tell the forge from repository URL {url!r}")


def _clean(path: str) -> str:
    path = path.strip("/")
    if path.endswith(".git"):
        path = path[:-4]
    if not path:
        raise RepositoryUrlError("the repository URL names no repository")
    return path
