"""circus-admin commands: each takes the parsed arguments, a client and the output."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import requests

from circus.cli.admin.client import Client
from circus.cli.admin.output import Output
from circus.common.errors import InvalidInput, NotFound, Unavailable

PROJECT_COLUMNS = ("id", "name", "enabled", "repository_url", "description")
JOBSET_COLUMNS = ("id", "name", "state", "branch", "nix_expression", "check_interval",
                  "last_checked_at")
BUILD_COLUMNS = ("id", "job_name", "status", "system", "evaluation_id", "completed_at")
EVAL_COLUMNS = ("id", "jobset_id", "status", "trigger_kind", "commit_hash", "created_at",
                "build_counts")
USER_COLUMNS = ("id", "username", "role", "enabled", "user_type", "email", "last_login_at")
KEY_COLUMNS = ("id", "name", "key_prefix", "role", "owner_id", "last_used_at", "revoked_at")
BUILDER_COLUMNS = ("id", "name", "ssh_uri", "systems", "max_jobs", "speed_factor", "enabled",
                   "current_jobs", "consecutive_failures", "last_failure")
SESSION_COLUMNS = ("machine_id", "name", "hostname", "systems", "connected", "current_jobs",
                   "load1", "last_seen")
TASK_COLUMNS = ("id", "type", "status", "attempts", "build_id", "last_error", "created_at")
AUDIT_COLUMNS = ("at", "actor", "action", "target", "remote_addr")

#: exit code of --wait when the deadline passes (like timeout(1))
TIMEOUT_EXIT = 124


def health(args: argparse.Namespace, client: Client, out: Output) -> int:
    # not client.get: an unhealthy server answers 503 with the same body, shown below
    try:
        response = client.session.get(client.url + "/health", timeout=client.timeout)
        body = response.json()
    except requests.RequestException as exc:   # includes a body that is not JSON
        raise Unavailable(f"cannot reach {client.url}: {exc}") from exc
    if out.as_json:
        out.data(body)
    else:
        out.message(f"status: {body['status']}  version: {body.get('version')}")
        out.message(f"database: {'ok' if body['database']['ok'] else body['database']}")
        out.message(f"broker: {'ok' if body['broker']['ok'] else body['broker']}")
        for daemon in body.get("daemons", []):
            out.message(f"daemon {daemon.get('service')}: "
                        f"{'fresh' if daemon.get('fresh') else 'stale'}")
    return 0 if response.status_code == 200 else 6


def status(args: argparse.Namespace, client: Client, out: Output) -> int:
    system = client.get("/api/v1/admin/system")
    stats = client.get("/api/v1/builds/stats")
    if out.as_json:
        out.data({"system": system, "builds": stats})
        return 0
    out.message(f"Circus {system['version']}")
    out.data(system["counts"])
    out.message(f"builds: {stats['queued']} queued, {stats['running']} running, "
                f"{stats['succeeded']} succeeded, {stats['failed']} failed")
    return 0


# ---------------------------------------------------------------------------
# projects and jobsets


def projects(args: argparse.Namespace, client: Client, out: Output) -> int:
    if args.action == "list":
        out.data(list(client.pages("/api/v1/projects")), PROJECT_COLUMNS)
    elif args.action == "create":
        body = {"name": args.name, "description": args.description or "",
                "repository_url": args.repository_url or ""}
        out.data(client.post("/api/v1/projects", body), PROJECT_COLUMNS)
    elif args.action == "delete":
        client.delete(f"/api/v1/projects/{args.name}")
        out.message(f"deleted project {args.name}")
    return 0


def jobsets(args: argparse.Namespace, client: Client, out: Output) -> int:
    base = f"/api/v1/projects/{args.project}/jobsets"
    if args.action == "list":
        out.data(list(client.pages(base)), JOBSET_COLUMNS)
    elif args.action == "create":
        body: dict[str, Any] = {"name": args.name, "nix_expression": args.nix_expression,
                                "flake_mode": not args.classic}
        for key in ("branch", "check_interval", "trigger_mode", "state"):
            if getattr(args, key) is not None:
                body[key] = getattr(args, key)
        out.data(client.post(base, body), JOBSET_COLUMNS)
    elif args.action == "delete":
        client.delete(f"{base}/{args.name}")
        out.message(f"deleted jobset {args.project}/{args.name}")
    return 0


# ---------------------------------------------------------------------------
# users and keys


def _id_of(client: Client, ref: str, collection: str, name_field: str, what: str,
           **query: Any) -> int:
    """``ref`` is an id, or the name (``name_field``) of an item of ``collection``."""
    if ref.isdigit():
        return int(ref)
    for item in client.pages(collection, **query):
        if item[name_field] == ref:
            return int(item["id"])
    raise NotFound(f"no {what} {ref}")


def _user_id(client: Client, ref: str) -> int:
    return _id_of(client, ref, "/api/v1/users", "username", "user", q=ref)


def users(args: argparse.Namespace, client: Client, out: Output) -> int:
    if args.action == "list":
        out.data(list(client.pages("/api/v1/users")), USER_COLUMNS)
        return 0
    if args.action == "create":
        password = args.password
        if args.password_file:
            password = Path(args.password_file).read_text().strip()
        out.data(client.post("/api/v1/users", {
            "username": args.username, "password": password, "role": args.role,
            "email": args.email, "full_name": args.full_name}), USER_COLUMNS)
        return 0
    user_id = _user_id(client, args.username)
    if args.action == "delete":
        client.delete(f"/api/v1/users/{user_id}")
        out.message(f"deleted user {args.username}")
        return 0
    change = {"set-role": {"role": getattr(args, "role", None)}, "enable": {"enabled": True},
              "disable": {"enabled": False}}[args.action]
    out.data(client.put(f"/api/v1/users/{user_id}", change), USER_COLUMNS)
    return 0


def api_keys(args: argparse.Namespace, client: Client, out: Output) -> int:
    if args.action == "list":
        out.data(list(client.pages("/api/v1/api-keys", all=args.all or None)), KEY_COLUMNS)
    elif args.action == "create":
        body: dict[str, Any] = {"name": args.name}
        if args.role:
            body["role"] = args.role
        if args.owner:
            body["owner_id"] = _user_id(client, args.owner)
        created = client.post("/api/v1/api-keys", body)
        if out.as_json:
            out.data(created)
        else:
            out.message(f"created key {created['id']} ({created['role']}); "
                        f"its secret is shown once:\n{created['key']}")
    elif args.action == "revoke":
        client.delete(f"/api/v1/api-keys/{args.id}")
        out.message(f"revoked key {args.id}")
    return 0


# ---------------------------------------------------------------------------
# builders


def _builder_id(client: Client, ref: str) -> int:
    return _id_of(client, ref, "/api/v1/admin/builders", "name", "builder")


def _text_or_file(value: str) -> str:
    """``@path`` means the contents of the file (a key from ``ssh-keyscan``)."""
    if not value.startswith("@"):
        return value
    try:
        return Path(value[1:]).read_text().strip()
    except OSError as exc:
        raise InvalidInput(f"cannot read {value[1:]}: {exc.strerror}") from None


def builders(args: argparse.Namespace, client: Client, out: Output) -> int:
    base = "/api/v1/admin/builders"
    if args.action == "list":
        out.data(list(client.pages(base)), BUILDER_COLUMNS)
    elif args.action == "add":
        body = {"name": args.name, "ssh_uri": args.ssh_uri, "systems": args.systems,
                "max_jobs": args.max_jobs, "speed_factor": args.speed_factor,
                "supported_features": args.features, "mandatory_features": args.mandatory}
        if args.ssh_key_file:
            body["ssh_key_file"] = args.ssh_key_file
        if args.public_host_key:
            body["public_host_key"] = _text_or_file(args.public_host_key)
        out.data(client.post(base, body), BUILDER_COLUMNS)
    elif args.action in ("enable", "disable"):
        out.data(client.put(f"{base}/{_builder_id(client, args.name)}",
                            {"enabled": args.action == "enable"}), BUILDER_COLUMNS)
    elif args.action == "remove":
        client.delete(f"{base}/{_builder_id(client, args.name)}")
        out.message(f"removed builder {args.name}")
    elif args.action == "sessions":
        path = base + "/sessions" + ("/connected" if args.connected else "")
        out.data(list(client.pages(path)), SESSION_COLUMNS)
    elif args.action == "session":
        out.data(client.get(f"{base}/sessions/{args.machine_id}"))
    return 0


# ---------------------------------------------------------------------------
# builds and evaluations


def builds(args: argparse.Namespace, client: Client, out: Output) -> int:
    if args.action == "list":
        filters = {k: getattr(args, k) for k in ("project_id", "jobset_id", "evaluation_id",
                                                   "status", "system", "job_name")}
        out.data(list(client.pages("/api/v1/builds", limit=args.limit, **filters)),
                 BUILD_COLUMNS)
    elif args.action == "show":
        build = client.get(f"/api/v1/builds/{args.id}")
        if not out.as_json:
            build["steps"] = len(client.get(f"/api/v1/builds/{args.id}/steps"))
        out.data(build)
    elif args.action == "log":
        response = client.request("GET", f"/api/v1/builds/{args.id}/log", stream=True)
        for chunk in response.iter_content(65536):
            sys.stdout.buffer.write(chunk)
        sys.stdout.flush()
    elif args.action in ("cancel", "restart", "bump"):
        out.data(client.post(f"/api/v1/builds/{args.id}/{args.action}"), BUILD_COLUMNS)
    elif args.action == "keep":
        flag = "false" if args.off else "true"
        out.data(client.put(f"/api/v1/builds/{args.id}/keep/{flag}"), BUILD_COLUMNS)
    return 0


def evaluations(args: argparse.Namespace, client: Client, out: Output) -> int:
    if args.action == "list":
        filters = {k: getattr(args, k) for k in ("project_id", "jobset_id", "status")}
        out.data(list(client.pages("/api/v1/evaluations", limit=args.limit, **filters)),
                 EVAL_COLUMNS)
        return 0
    if args.action == "show":
        evaluation = client.get(f"/api/v1/evaluations/{args.id}")
        out.data(evaluation)
        return 0
    body: dict[str, Any] = ({"jobset_id": int(args.jobset)} if args.jobset.isdigit()
                            else {"project": args.project, "jobset": args.jobset})
    if "project" in body and not args.project:
        raise InvalidInput("give --project with a jobset name (or a jobset id)")
    evaluation = client.post("/api/v1/evaluations/trigger", body)
    out.message(f"evaluation {evaluation['id']} {evaluation['status']}")
    if not args.wait:
        if out.as_json:
            out.data(evaluation)
        return 0
    return wait_for(client, out, int(evaluation["id"]), args.timeout, args.interval)


def wait_for(client: Client, out: Output, evaluation_id: int, timeout: float,
             interval: float) -> int:
    """Follow an evaluation and then its builds until all finished; 0 iff all succeeded."""
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        evaluation = client.get(f"/api/v1/evaluations/{evaluation_id}")
        state = evaluation["status"]
        if state not in ("pending", "running"):
            break
        line = f"evaluation {evaluation_id}: {state}"
        if evaluation.get("attrs_total"):
            line += f" ({evaluation.get('attrs_done') or 0}/{evaluation['attrs_total']} jobs)"
        if line != last:
            out.progress(line)
            last = line
        if time.monotonic() > deadline:
            out.progress(f"gave up waiting after {timeout:.0f}s")
            return TIMEOUT_EXIT
        time.sleep(interval)
    if state != "completed":
        out.progress(f"evaluation {evaluation_id} {state}: {evaluation.get('error_message')}")
        if out.as_json:
            out.data({"evaluation": evaluation, "builds": []})
        return 1
    errors = evaluation.get("errors") or []
    out.progress(f"evaluation {evaluation_id} completed"
                 + (f" with {len(errors)} evaluation error(s)" if errors else ""))
    while True:
        found = list(client.pages("/api/v1/builds", evaluation_id=evaluation_id))
        running = [b for b in found if b["status"] in ("pending", "running")]
        failed = [b for b in found if b["status"] not in ("pending", "running", "succeeded")]
        line = (f"builds: {len(found) - len(running)}/{len(found)} finished, "
                f"{len(failed)} failed")
        if line != last:
            out.progress(line)
            last = line
        if not running:
            break
        if time.monotonic() > deadline:
            out.progress(f"gave up waiting after {timeout:.0f}s")
            return TIMEOUT_EXIT
        time.sleep(interval)
    if out.as_json:
        out.data({"evaluation": evaluation, "builds": found})
    else:
        out.data(found, BUILD_COLUMNS)
    return 1 if failed or errors else 0


# ---------------------------------------------------------------------------
# notifications, audit, config


def notifications(args: argparse.Namespace, client: Client, out: Output) -> int:
    if args.action == "list":
        out.data(list(client.pages("/api/v1/admin/notification-tasks", limit=args.limit,
                                   status=args.status)), TASK_COLUMNS)
    elif args.action == "retry":
        out.data(client.post(f"/api/v1/admin/notification-tasks/{args.id}/retry"),
                 TASK_COLUMNS)
    return 0


def audit(args: argparse.Namespace, client: Client, out: Output) -> int:
    out.data(list(client.pages("/api/v1/admin/audit-log", limit=args.limit,
                               action=args.action_filter, actor=args.actor)), AUDIT_COLUMNS)
    return 0


def config(args: argparse.Namespace, client: Client, out: Output) -> int:
    if args.action == "get":
        found = client.get("/api/v1/admin/config")
        if out.as_json:
            out.data(found)
        else:
            # the settings indented, one per line (as a record they were one long line)
            out.message(f"# config file: {found.get('config_file') or '(none)'}; editable "
                        f"over the API: {'yes' if found.get('editable') else 'no'}")
            out.data(json.dumps(found.get("config"), indent=2, default=str))
    elif args.action == "apply":
        result = client.put("/api/v1/admin/config", {"toml": Path(args.file).read_text()})
        if out.as_json:
            out.data(result)
        else:
            out.message(f"wrote {result['written']}; declarative changes: "
                        + ", ".join(f"{k} {len(v)}" for k, v in result["declarative"].items())
                        + "; restart the daemons for other settings")
    return 0
