"""Git repositories of jobsets: URL checks and one bare mirror per repository.

Mirrors live under ``<evaluator.work_dir>/mirrors``; a fetch takes a file lock,
so two evaluations of jobsets sharing a repository never race on its refs.
Every command that reaches the remote goes through :mod:`circus.evaluator.remotes`
first (public addresses or ``server.outbound_allowlist``, the checked address only).
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import os
import re
import tarfile
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from circus.common.nix import process
from circus.common.outbound import Allowlist, OutboundError
from circus.evaluator import remotes


class GitError(Exception):
    """A repository could not be fetched or read; the message is for users."""


#: git@host:path (scp-like syntax: a colon before the first slash, no scheme)
_SCP_LIKE = re.compile(r"^(?:[^@/:]+@)?[^/:]+:(?!//)")


def url_scheme(url: str) -> str:
    """The transport a git URL uses: https, http, ssh, git or file (local paths)."""
    if url.startswith("/"):
        return "file"
    if "://" in url:
        scheme = urlsplit(url).scheme.lower()
        return scheme.removeprefix("git+")
    if "::" in url:
        # remote helpers (ext::, fd::) run arbitrary commands
        return url.split("::", 1)[0].lower()
    if _SCP_LIKE.match(url):
        return "ssh"
    return "unknown"


def normalise_url(url: str) -> str:
    """Strip the flake-style ``git+`` prefix git itself does not understand."""
    url = url.strip()
    if url.startswith("git+") and "://" in url:
        return url[4:]
    return url


#: flake reference shorthands git would misread as scp-like ssh hosts
_FLAKE_SHORTHANDS = ("github:", "gitlab:", "sourcehut:", "flake:", "path:", "tarball+")


def check_url(url: str, allowed_schemes: Sequence[str]) -> str:
    """Return the normalised URL or raise :class:`GitError` naming the problem."""
    if not url.strip():
        raise GitError("no repository URL is set")
    if url.strip().startswith(_FLAKE_SHORTHANDS):
        raise GitError(f"{url!r} is a flake reference, not a git URL; use the repository's "
                       "git URL (e.g. https://github.com/owner/repo)")
    if url.strip().startswith("-"):
        raise GitError(f"invalid repository URL {url!r}")
    url = normalise_url(url)
    scheme = url_scheme(url)
    if scheme not in allowed_schemes:
        allowed = ", ".join(allowed_schemes) or "none"
        raise GitError(f"URL scheme {scheme!r} of {url!r} is not allowed "
                       f"(server.allowed_url_schemes: {allowed})")
    return url


DEFAULT_SSH_COMMAND = "ssh -o BatchMode=yes"
#: public remotes only
NO_ALLOWLIST = Allowlist()


def _git_env(allowed_schemes: Sequence[str]) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_ASKPASS": "/bin/false",
        "SSH_ASKPASS": "/bin/false",
        # transports git may use, also for redirects and submodules
        "GIT_ALLOW_PROTOCOL": ":".join(allowed_schemes),
        "GIT_SSH_COMMAND": env.get("GIT_SSH_COMMAND", DEFAULT_SSH_COMMAND),
        "LC_ALL": "C",
    })
    return env


def _first_error_line(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in lines:
        if line.startswith(("fatal:", "error:")):
            return line
    return lines[-1] if lines else "no error output"


@dataclass(frozen=True)
class Mirror:
    url: str
    path: Path
    timeout: float
    allowed_schemes: tuple[str, ...]
    #: ``server.outbound_allowlist``: the non-public hosts the remote may be on
    allowlist: Allowlist = NO_ALLOWLIST

    @classmethod
    def for_url(cls, work_dir: str | Path, url: str, *, timeout: float,
                allowed_schemes: Sequence[str], allowlist: Allowlist = NO_ALLOWLIST
                ) -> Mirror:
        url = check_url(url, allowed_schemes)
        digest = hashlib.sha256(url.encode()).hexdigest()[:24]
        tail = re.sub(r"[^A-Za-z0-9._-]", "_", url.rstrip("/").rsplit("/", 1)[-1])[:40]
        path = Path(work_dir) / "mirrors" / f"{digest}-{tail}"
        return cls(url, path, timeout, tuple(allowed_schemes), allowlist)

    @property
    def file_url(self) -> str:
        return f"file://{self.path}"

    def git(self, *args: str, timeout: float | None = None,
            remote: remotes.PinnedRemote | None = None) -> process.ProcessResult:
        env = _git_env(self.allowed_schemes)
        return process.run(["git", "--git-dir", str(self.path), *args],
                           timeout=timeout or self.timeout,
                           env=remote.environ(env) if remote is not None else env)

    def remote(self) -> remotes.PinnedRemote:
        """The remote checked now (one DNS lookup), for the commands of one fetch."""
        env = _git_env(self.allowed_schemes)
        try:
            return remotes.pin(self.url, url_scheme(self.url), self.allowlist,
                               env["GIT_SSH_COMMAND"])
        except OutboundError as exc:
            raise GitError(f"fetching {self.url} {'refused' if exc.refused else 'failed'}: "
                           f"{str(exc).removeprefix('refused: ')}") from None

    @contextmanager
    def locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(f"{self.path}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _ensure(self) -> None:
        if (self.path / "HEAD").exists():
            return
        done = process.run(["git", "init", "--bare", "-q", str(self.path)], timeout=60)
        if done.returncode != 0:
            raise GitError(f"cannot create a mirror in {self.path}: "
                           f"{_first_error_line(done.stderr)}")

    def default_branch(self, remote: remotes.PinnedRemote) -> str:
        done = process.run(["git", "ls-remote", "--symref", "--", remote.url, "HEAD"],
                           timeout=self.timeout,
                           env=remote.environ(_git_env(self.allowed_schemes)))
        self._raise_for(done, "reading the default branch of")
        match = re.search(r"^ref: refs/heads/(\S+)\s+HEAD", done.stdout, re.M)
        if not match:
            raise GitError(f"{self.url} has no default branch (HEAD); set the jobset's branch")
        return match.group(1)

    def fetch(self, branch: str | None) -> tuple[str, str]:
        """Fetch ``branch`` (default: the remote's HEAD); return ``(branch, commit)``."""
        remote = self.remote()
        with self.locked():
            self._ensure()
            if not branch:
                branch = self.default_branch(remote)
            if not _valid_branch(branch):
                raise GitError(f"invalid branch name {branch!r}")
            ref = f"refs/heads/{branch}"
            done = self.git("fetch", "--quiet", "--force", "--no-tags", "--", remote.url,
                            f"+{ref}:{ref}", remote=remote)
            if done.returncode != 0 and "couldn't find remote ref" in done.stderr:
                raise GitError(f"branch {branch!r} does not exist in {self.url}")
            self._raise_for(done, "fetching")
            return branch, self.resolve(ref)

    def fetch_commit(self, rev: str) -> bool:
        """Fetch one commit by id (pull requests from forks); False when the remote refuses
        it (GitError when the destination is refused)."""
        if not re.fullmatch(r"[0-9a-f]{7,64}", rev):
            return False
        remote = self.remote()
        with self.locked():
            self._ensure()
            done = self.git("fetch", "--quiet", "--no-tags", "--", remote.url, rev,
                            remote=remote)
        return done.returncode == 0 and self.has_commit(rev)

    def resolve(self, rev: str) -> str:
        done = self.git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
        if done.returncode != 0:
            raise GitError(f"{rev!r} is not a commit of {self.url}")
        return done.stdout.strip()

    def has_commit(self, rev: str) -> bool:
        return self.git("cat-file", "-e", f"{rev}^{{commit}}").returncode == 0

    def has_file(self, rev: str, path: str) -> bool:
        return self.git("cat-file", "-e", f"{rev}:{path}").returncode == 0

    def rev_count(self, rev: str) -> int:
        done = self.git("rev-list", "--count", rev)
        try:
            return int(done.stdout.strip())
        except ValueError:
            return 0

    def export(self, rev: str, target: Path) -> None:
        """Write the tree of ``rev`` to ``target`` (a new directory)."""
        archive = process_bytes(["git", "--git-dir", str(self.path), "archive",
                                 "--format=tar", rev], timeout=self.timeout,
                                env=_git_env(self.allowed_schemes))
        target.mkdir(parents=True)
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(target, filter="tar")

    def _raise_for(self, done: process.ProcessResult, what: str) -> None:
        if done.timed_out:
            raise GitError(f"{what} {self.url} timed out after {self.timeout:g} s "
                           "(evaluator.git_timeout)")
        if done.returncode != 0:
            raise GitError(f"{what} {self.url} failed: {_first_error_line(done.stderr)}")


def _valid_branch(branch: str) -> bool:
    return (bool(branch) and not branch.startswith(("-", "/")) and ".." not in branch
            and re.fullmatch(r"[A-Za-z0-9._/+@-]+", branch) is not None)


def process_bytes(argv: list[str], *, timeout: float, env: dict[str, str]) -> bytes:
    """Run and return stdout as bytes (git archive); raise GitError on failure."""
    import subprocess

    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(process.killed_with_parent(argv), stdout=out,
                                stderr=subprocess.PIPE, env=env, start_new_session=True)
        try:
            _, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill_process_group(proc)
            proc.communicate()
            raise GitError(f"{' '.join(argv[:4])} timed out") from None
        if proc.returncode != 0:
            raise GitError(f"git archive failed: {_first_error_line(stderr.decode())}")
        out.seek(0)
        return out.read()
