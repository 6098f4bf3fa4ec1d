"""``circus-admin``: manage a Circus instance over its REST API.

Global options: ``--url`` (``CIRCUS_URL``), ``--api-key`` (``CIRCUS_API_KEY``),
``--json``. Exit codes: 0 ok, 1 builds/evaluation failed (``--wait``), 2 invalid
input, 3 not authenticated or not allowed, 4 not found, 5 conflict, 6 server
unreachable or failing, 124 ``--wait`` timed out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from circus.cli.admin import commands
from circus.cli.admin.client import Client
from circus.cli.admin.output import Output
from circus.common.errors import CircusError

ROLES = ["admin", "create-projects", "restart-jobs", "cancel-build", "bump-to-front",
         "eval-jobset", "read-only"]
BUILD_STATUSES = ["pending", "running", "succeeded", "failed", "dependency_failed", "aborted",
                  "cancelled", "failed_with_output", "timeout", "cached_failure",
                  "unsupported_system", "log_limit_exceeded", "nar_size_limit_exceeded",
                  "non_deterministic", "oom_killed"]


def _actions(parser: argparse.ArgumentParser, handler: Callable[..., int]
             ) -> argparse._SubParsersAction:  # type: ignore[type-arg]
    parser.set_defaults(handler=handler)
    sub = parser.add_subparsers(dest="action", required=True)
    return sub


def _global_options(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """--url, --api-key, --json and --timeout. The top-level parser holds the defaults;
    every command accepts them too (``builds list --json``, as the docs write it), with
    SUPPRESS so a command's parser does not overwrite what was given before it."""
    def default(value: object) -> object:
        return value if defaults else argparse.SUPPRESS

    parser.add_argument("--url", default=default(os.environ.get("CIRCUS_URL",
                                                                "http://localhost:3000")),
                        help="server URL (CIRCUS_URL; default http://localhost:3000)")
    parser.add_argument("--api-key", default=default(os.environ.get("CIRCUS_API_KEY")),
                        help="API key (CIRCUS_API_KEY)")
    parser.add_argument("--json", action="store_true", default=default(False),
                        help="machine-readable output")
    parser.add_argument("--timeout", type=float, default=default(30.0), dest="http_timeout",
                        help="seconds per HTTP request (default 30)")


def _commands(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """Every parser below ``parser`` that runs a command (has no subcommands itself)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                if any(isinstance(a, argparse._SubParsersAction) for a in child._actions):
                    yield from _commands(child)
                else:
                    yield child


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="circus-admin", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _global_options(parser, defaults=True)
    top = parser.add_subparsers(dest="command", required=True)

    top.add_parser("health", help="server, database, broker and daemon health").set_defaults(
        handler=commands.health)
    top.add_parser("status", help="counts and queue summary").set_defaults(
        handler=commands.status)

    sub = _actions(top.add_parser("projects", help="projects"), commands.projects)
    sub.add_parser("list")
    create = sub.add_parser("create")
    create.add_argument("name")
    create.add_argument("--description")
    create.add_argument("--repository-url", dest="repository_url")
    sub.add_parser("delete").add_argument("name", help="project name or id")

    sub = _actions(top.add_parser("jobsets", help="jobsets of a project"), commands.jobsets)
    for name in ("list", "create", "delete"):
        action = sub.add_parser(name)
        action.add_argument("--project", required=True, help="project name or id")
        if name != "list":
            action.add_argument("name")
        if name == "create":
            action.add_argument("--nix-expression", dest="nix_expression", default="hydraJobs")
            action.add_argument("--branch")
            action.add_argument("--classic", action="store_true", help="not a flake")
            action.add_argument("--check-interval", dest="check_interval", type=int)
            action.add_argument("--trigger-mode", dest="trigger_mode",
                                choices=["source_change", "interval"])
            action.add_argument("--state", choices=["enabled", "disabled", "one_shot",
                                                    "one_at_a_time"])

    sub = _actions(top.add_parser("api-keys", help="API keys"), commands.api_keys)
    sub.add_parser("list").add_argument("--all", action="store_true", help="admins: everyone's")
    create = sub.add_parser("create")
    create.add_argument("name")
    create.add_argument("--role", choices=ROLES)
    create.add_argument("--owner", help="username (admins)")
    sub.add_parser("revoke").add_argument("id", type=int)

    sub = _actions(top.add_parser("users", help="users"), commands.users)
    sub.add_parser("list")
    create = sub.add_parser("create")
    create.add_argument("username")
    create.add_argument("--password")
    create.add_argument("--password-file", dest="password_file")
    create.add_argument("--role", choices=ROLES, default="read-only")
    create.add_argument("--email")
    create.add_argument("--full-name", dest="full_name")
    role = sub.add_parser("set-role")
    role.add_argument("username")
    role.add_argument("role", choices=ROLES)
    for name in ("enable", "disable", "delete"):
        sub.add_parser(name).add_argument("username")

    sub = _actions(top.add_parser("builders", help="SSH builders and agents"),
                   commands.builders)
    sub.add_parser("list")
    add = sub.add_parser("add")
    add.add_argument("name")
    add.add_argument("ssh_uri")
    add.add_argument("--systems", nargs="+", default=["x86_64-linux"])
    add.add_argument("--max-jobs", dest="max_jobs", type=int, default=1)
    add.add_argument("--speed-factor", dest="speed_factor", type=float, default=1.0)
    add.add_argument("--features", nargs="*", default=[])
    add.add_argument("--mandatory", nargs="*", default=[])
    add.add_argument("--ssh-key-file", dest="ssh_key_file",
                     help="private key the queue runner logs in with")
    add.add_argument("--public-host-key", dest="public_host_key",
                     help="the builder's host key ('ssh-ed25519 AAAA...' or a known_hosts "
                          "line); @FILE reads it from a file, e.g. ssh-keyscan output")
    for name in ("enable", "disable", "remove"):
        sub.add_parser(name).add_argument("name", help="builder name or id")
    sub.add_parser("sessions", help="agent sessions").add_argument(
        "--connected", action="store_true")
    sub.add_parser("session", help="one agent").add_argument("machine_id")

    sub = _actions(top.add_parser("builds", help="builds"), commands.builds)
    listing = sub.add_parser("list")
    for flag in ("project-id", "jobset-id", "evaluation-id"):
        listing.add_argument(f"--{flag}", dest=flag.replace("-", "_"), type=int)
    listing.add_argument("--status", choices=BUILD_STATUSES)
    listing.add_argument("--system")
    listing.add_argument("--job", dest="job_name")
    listing.add_argument("--limit", type=int, default=50)
    for name in ("show", "log", "cancel", "restart", "bump"):
        sub.add_parser(name).add_argument("id", type=int)
    keep = sub.add_parser("keep")
    keep.add_argument("id", type=int)
    keep.add_argument("--off", action="store_true", help="unpin instead")

    sub = _actions(top.add_parser("evaluations", help="evaluations"), commands.evaluations)
    listing = sub.add_parser("list")
    listing.add_argument("--project-id", dest="project_id", type=int)
    listing.add_argument("--jobset-id", dest="jobset_id", type=int)
    listing.add_argument("--status")
    listing.add_argument("--limit", type=int, default=20)
    sub.add_parser("show").add_argument("id", type=int)
    trigger = sub.add_parser("trigger")
    trigger.add_argument("jobset", help="jobset id, or name with --project")
    trigger.add_argument("--project")
    trigger.add_argument("--wait", action="store_true",
                         help="follow the evaluation and its builds; exit 1 if any failed")
    trigger.add_argument("--wait-timeout", dest="timeout", type=float, default=3600)
    trigger.add_argument("--interval", type=float, default=1.0)

    sub = _actions(top.add_parser("notifications", help="notification tasks"),
                   commands.notifications)
    listing = sub.add_parser("list")
    listing.add_argument("--status", choices=["pending", "running", "completed", "failed"])
    listing.add_argument("--limit", type=int, default=50)
    sub.add_parser("retry").add_argument("id", type=int)

    audit = top.add_parser("audit", help="the audit log")
    audit.set_defaults(handler=commands.audit)
    audit.add_argument("--action", dest="action_filter")
    audit.add_argument("--actor")
    audit.add_argument("--limit", type=int, default=50)

    sub = _actions(top.add_parser("config", help="server configuration"), commands.config)
    sub.add_parser("get")
    sub.add_parser("apply").add_argument("file")

    dev = top.add_parser("dev", help="developer tools").add_subparsers(dest="action",
                                                                       required=True)
    docs = dev.add_parser("api-docs", help="write docs/API.md from the OpenAPI document")
    docs.add_argument("--check", action="store_true", help="fail if docs/API.md is stale")
    docs.add_argument("--output", default="docs/API.md")
    docs.set_defaults(handler=None)
    for command in _commands(parser):
        if command is not docs:
            _global_options(command, defaults=False)
    return parser


#: where the API's request validation found a field: not part of the field's name
REQUEST_LOCATIONS = ("json", "query", "form", "path")


def detail_lines(details: object, path: str = "") -> list[str]:
    """An error's details as lines: ``field: reason`` for the API's ``{field: [reasons]}``
    (nested tables dotted, the request location left out), JSON for anything else."""
    if not details:
        return []
    if isinstance(details, dict):
        lines = []
        for key, value in details.items():
            inner = path if not path and key in REQUEST_LOCATIONS else \
                f"{path}.{key}" if path else str(key)
            if isinstance(value, dict):
                lines += detail_lines(value, inner)
                continue
            for reason in value if isinstance(value, list) else [value]:
                text = reason if isinstance(reason, str) else json.dumps(reason)
                lines.append(f"{inner}: {text}" if inner else text)
        return lines
    return [f"{path}: {json.dumps(details)}" if path else json.dumps(details)]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "dev":
        from circus.cli.admin import apidocs

        return apidocs.main(Path(args.output), args.check)
    out = Output(args.json)
    client = Client(args.url, args.api_key, timeout=args.http_timeout)
    try:
        return int(args.handler(args, client, out))
    except CircusError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        for line in detail_lines(exc.details):
            print(f"  {line}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
