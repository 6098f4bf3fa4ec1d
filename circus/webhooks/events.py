"""Reading forge deliveries: push, pull/merge request, ping (everything else is ignored).

GitHub, Gitea/Forgejo and GitLab name the same facts differently; each parser
returns a :class:`ForgeEvent`. Malformed bodies raise ``InvalidInput`` (400).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from circus.common.enums import ForgeType
from circus.common.errors import InvalidInput

_SHA = re.compile(r"^[0-9a-f]{40}([0-9a-f]{24})?$")
_NULL_SHA = re.compile(r"^0+$")
#: what git allows in branch names, conservatively (the evaluator puts them in refspecs)
_BRANCH = re.compile(r"^(?!-)(?!/)(?!.*\.\.)(?!.*@\{)(?!.*//)[^\x00-\x20\x7f~^:?*\[\\]{1,255}"
                     r"(?<![./])(?<!\.lock)$")


@dataclass(frozen=True)
class ForgeEvent:
    #: ping, push, pull_request, or ignored
    kind: str
    #: the forge's own event name (for the audit log and the answer)
    name: str
    branch: str | None = None
    commit: str | None = None
    default_branch: str | None = None
    pr_number: int | None = None
    pr_action: str | None = None
    head_branch: str | None = None
    base_branch: str | None = None
    reason: str | None = None


def _ignored(name: str, reason: str) -> ForgeEvent:
    return ForgeEvent("ignored", name, reason=reason)


def decode_body(headers: Mapping[str, str], body: bytes) -> dict[str, Any]:
    """The JSON object of a delivery (GitHub may send it form-encoded as ``payload=``)."""
    content_type = headers.get("content-type", "").split(";")[0].strip().lower()
    try:
        text = body.decode()
        if content_type == "application/x-www-form-urlencoded":
            values = parse_qs(text, strict_parsing=False).get("payload")
            if not values:
                raise InvalidInput("form-encoded delivery without a payload field")
            text = values[0]
        value = json.loads(text)
    except ValueError as exc:  # includes UnicodeDecodeError and JSONDecodeError
        raise InvalidInput(f"the body is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InvalidInput("the body must be a JSON object")
    return value


def _get(body: Mapping[str, Any], path: str, kind: type | tuple[type, ...]) -> Any:
    value: Any = body
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            raise InvalidInput(f"missing field {path}")
        value = value[part]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise InvalidInput(f"field {path} has the wrong type")
    return value


def _opt(body: Mapping[str, Any], path: str) -> str | None:
    try:
        value = _get(body, path, str)
    except InvalidInput:
        return None
    return str(value)


def _branch(value: str, field: str) -> str:
    if not _BRANCH.match(value):
        raise InvalidInput(f"field {field} is not a usable branch name")
    return value


def _sha(value: str, field: str) -> str:
    value = value.lower()
    if not _SHA.match(value):
        raise InvalidInput(f"field {field} is not a commit hash")
    return value


def _push(name: str, body: Mapping[str, Any], default_branch_path: str) -> ForgeEvent:
    ref = _get(body, "ref", str)
    after = _get(body, "after", str)
    if not ref.startswith("refs/heads/"):
        return _ignored(name, f"{ref} is not a branch")
    branch = _branch(ref[len("refs/heads/"):], "ref")
    if _NULL_SHA.match(after) or body.get("deleted") is True:
        return _ignored(name, f"branch {branch} was deleted")
    default = _opt(body, default_branch_path)
    return ForgeEvent("push", name, branch=branch, commit=_sha(after, "after"),
                      default_branch=default if default and _BRANCH.match(default) else None)


def _pull_request(name: str, number: int, action: str, head: str, sha: str, base: str,
                  default: str | None) -> ForgeEvent:
    if number <= 0 or number > 2**31:
        raise InvalidInput("the pull request number is out of range")
    return ForgeEvent("pull_request", name, pr_number=number, pr_action=action,
                      head_branch=_branch(head, "head branch"), commit=_sha(sha, "head sha"),
                      base_branch=_branch(base, "base branch"),
                      default_branch=default if default and _BRANCH.match(default) else None)


def parse(forge: ForgeType, headers: Mapping[str, str], body: bytes) -> ForgeEvent:
    """``headers`` has lower-case names."""
    if forge is ForgeType.github:
        return _github(headers, body)
    if forge is ForgeType.gitlab:
        return _gitlab(headers, body)
    return _gitea(forge, headers, body)


#: pull-request actions that bring new commits (GitHub spells it "synchronize")
_GITHUB_PR_ACTIONS = ("opened", "synchronize", "reopened")
_GITEA_PR_ACTIONS = ("opened", "synchronized", "reopened")


def _github(headers: Mapping[str, str], body: bytes) -> ForgeEvent:
    name = headers.get("x-github-event")
    if not name:
        raise InvalidInput("missing X-GitHub-Event header")
    return _github_style(name, decode_body(headers, body), _GITHUB_PR_ACTIONS)


def _gitea(forge: ForgeType, headers: Mapping[str, str], body: bytes) -> ForgeEvent:
    name = headers.get("x-forgejo-event") if forge is ForgeType.forgejo else None
    name = name or headers.get("x-gitea-event")
    if not name:
        raise InvalidInput(f"missing X-{forge.value.capitalize()}-Event header")
    return _github_style(name, decode_body(headers, body), _GITEA_PR_ACTIONS)


def _github_style(name: str, payload: Mapping[str, Any], pr_actions: tuple[str, ...]
                  ) -> ForgeEvent:
    """GitHub's event payloads, which Gitea and Forgejo copy."""
    if name == "ping":
        return ForgeEvent("ping", name)
    if name == "push":
        return _push(name, payload, "repository.default_branch")
    if name == "pull_request":
        action = _get(payload, "action", str)
        if action not in pr_actions:
            return _ignored(name, f"pull request action {action!r}")
        return _pull_request(name, _get(payload, "number", int), action,
                             _get(payload, "pull_request.head.ref", str),
                             _get(payload, "pull_request.head.sha", str),
                             _get(payload, "pull_request.base.ref", str),
                             _opt(payload, "repository.default_branch"))
    return _ignored(name, f"event {name!r} is not handled")


def _gitlab(headers: Mapping[str, str], body: bytes) -> ForgeEvent:
    name = headers.get("x-gitlab-event")
    if not name:
        raise InvalidInput("missing X-Gitlab-Event header")
    payload = decode_body(headers, body)
    if name == "Push Hook":
        return _push(name, payload, "project.default_branch")
    if name == "Merge Request Hook":
        attributes = _get(payload, "object_attributes", dict)
        action = _get(attributes, "action", str)
        # "update" also fires for title or label edits; only new commits carry oldrev
        if action not in ("open", "reopen", "update") or (
                action == "update" and not attributes.get("oldrev")):
            return _ignored(name, f"merge request action {action!r} without new commits"
                            if action == "update" else f"merge request action {action!r}")
        return _pull_request(name, _get(attributes, "iid", int), action,
                             _get(attributes, "source_branch", str),
                             _get(attributes, "last_commit.id", str),
                             _get(attributes, "target_branch", str),
                             _opt(payload, "project.default_branch"))
    return _ignored(name, f"event {name!r} is not handled")
