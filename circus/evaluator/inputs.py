"""A jobset's inputs, resolved to fixed revisions (and, for classic jobsets, store paths).

Resolution happens in two steps. :func:`resolve` fetches git mirrors and pins
every input (this is all a scheduled check needs to decide "unchanged");
:func:`materialise` then puts classic jobsets' sources into the Nix store.

Classic input conventions (Hydra's ``inputsToArgs``):

* ``git``: value ``<url> [<branch>]``; passed as ``{ outPath; rev; shortRev;
  revCount; uri; inputType; }``; ``revision`` pins a commit.
* ``string``: passed as a string; ``boolean``: ``true``/``false``; ``nix``: the
  value is a Nix expression passed as is.
* ``path``: a local file or directory, copied into the store; ``{ outPath; }``.
* ``build``: ``<project>:<jobset>:<job>``, the newest successful build of that
  job; ``{ outPath; drvPath; outputs...; }``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from circus.auth.actor import Actor
from circus.auth.visibility import can_see_project
from circus.common.config import Settings
from circus.common.enums import ActorKind, BuildStatus, InputType
from circus.common.models import Build, Jobset, Project, User
from circus.common.nix import process
from circus.common.outbound import Allowlist
from circus.evaluator.git import GitError, Mirror
from circus.evaluator.program import ClassicArg, nix_string


class InputError(Exception):
    """An input cannot be resolved (fetch failure, bad value); the message is for users."""


@dataclass
class ResolvedInput:
    name: str
    type: str
    value: str
    revision: str | None = None
    uri: str | None = None
    branch: str | None = None
    store_path: str | None = None
    rev_count: int | None = None
    drv_path: str | None = None
    outputs: dict[str, str] = field(default_factory=dict)

    def identity(self) -> dict[str, Any]:
        """What decides whether the input changed."""
        return {"name": self.name, "type": self.type, "value": self.value,
                "revision": self.revision}


@dataclass
class Resolution:
    flake_mode: bool
    nix_expression: str
    #: classic: the input holding the expression file (None: the project's repository)
    expression_input: str | None
    #: flake: the repository; classic: the project's repository when it holds the file
    main: ResolvedInput | None
    inputs: list[ResolvedInput]

    @property
    def inputs_hash(self) -> str:
        data = {
            "flake": self.flake_mode,
            "expression": self.nix_expression,
            "expression_input": self.expression_input,
            "main": self.main.identity() if self.main else None,
            "inputs": sorted((i.identity() for i in self.inputs), key=lambda i: i["name"]),
        }
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()

    @property
    def source(self) -> ResolvedInput | None:
        """The input holding the expression (flake repository or classic file)."""
        if self.flake_mode or self.expression_input is None:
            return self.main
        return next((i for i in self.inputs if i.name == self.expression_input), None)

    @property
    def commit_hash(self) -> str | None:
        source = self.source
        return source.revision if source is not None and source.type == "git" else None

    def to_json(self) -> dict[str, Any]:
        """``{name: {type, value, revision, ...}}`` as stored on the evaluation; the
        project's repository (flake, or the classic expression source) is ``repository``."""
        data: dict[str, Any] = {}
        if self.main is not None:
            data["repository"] = _public(self.main)
        for item in self.inputs:
            data[item.name] = _public(item)
        return data


def _public(item: ResolvedInput) -> dict[str, Any]:
    return {k: v for k, v in asdict(item).items() if k != "name" and v not in (None, {})}


def mirror_for(settings: Settings, url: str) -> Mirror:
    try:
        return Mirror.for_url(settings.evaluator.work_dir, url,
                              timeout=settings.evaluator.git_timeout,
                              allowed_schemes=settings.server.allowed_url_schemes,
                              allowlist=Allowlist.parse(settings.server.outbound_allowlist))
    except GitError as exc:
        raise InputError(str(exc)) from None


def _fetch_git(settings: Settings, name: str, url: str, branch: str | None,
               pinned: str | None) -> ResolvedInput:
    mirror = mirror_for(settings, url)
    try:
        branch, head = mirror.fetch(branch)
        revision = head
        if pinned:
            if not mirror.has_commit(pinned) and not mirror.fetch_commit(pinned):
                raise InputError(f"input {name!r}: revision {pinned} is not in {mirror.url}")
            revision = mirror.resolve(pinned)
    except GitError as exc:
        raise InputError(str(exc)) from None
    return ResolvedInput(name=name, type=InputType.git.value, value=url, revision=revision,
                         uri=mirror.url, branch=branch)


def _parse_git_value(value: str) -> tuple[str, str | None]:
    parts = value.split()
    if not parts:
        raise InputError("a git input needs a URL")
    return parts[0], (parts[1] if len(parts) > 1 else None)


def _add_to_store(settings: Settings, path: Path) -> str:
    done = process.run(["nix-store", "--add", str(path)], env=settings.nix_environ(),
                       timeout=settings.evaluator.nix_timeout)
    if done.returncode != 0:
        raise InputError(f"cannot add {path} to the Nix store: {done.stderr.strip()[-500:]}")
    return done.stdout.strip()


def owner_actor(session: Session, project: Project) -> Actor:
    """Whose eyes a jobset reads other projects' builds with: its project's owner."""
    owner = session.get(User, project.owner_id) if project.owner_id is not None else None
    if owner is None or not owner.enabled:
        return Actor.anonymous()
    return Actor(ActorKind.user, name=owner.username, role=owner.role, user_id=owner.id)


def _resolve_build_input(session: Session, name: str, value: str, project: Project
                         ) -> ResolvedInput:
    try:
        project_name, jobset_name, job = value.split(":", 2)
    except ValueError:
        raise InputError(f"input {name!r}: a build input is <project>:<jobset>:<job>, "
                         f"got {value!r}") from None
    source = session.scalar(select(Project).where(Project.name == project_name))
    # a project hidden from the jobset's owner does not exist for the jobset (the same
    # message as for a missing one, so nothing tells the two apart)
    if source is None or (source.id != project.id and not can_see_project(
            session, owner_actor(session, project), source.id)):
        raise InputError(f"input {name!r}: no successful build of {value!r} (no project "
                         f"{project_name!r} visible to the owner of project {project.name!r})")
    build = session.scalars(
        select(Build).join(Jobset, Jobset.id == Build.jobset_id)
        .join(Project, Project.id == Build.project_id)
        .where(Project.id == source.id, Jobset.name == jobset_name,
               Build.job_name == job, Build.status == BuildStatus.succeeded)
        .order_by(Build.id.desc()).limit(1)).first()
    if build is None:
        raise InputError(f"input {name!r}: no successful build of {value!r}")
    outputs = build.output_map
    out = outputs.get("out") or next(iter(outputs.values()), None)
    if out is None or not Path(out).exists():
        raise InputError(f"input {name!r}: the output of build {build.id} is not in the store")
    return ResolvedInput(name=name, type=InputType.build.value, value=value,
                         revision=str(build.id), store_path=out, drv_path=build.drv_path,
                         outputs=outputs)


def _resolve_input(session: Session, settings: Settings, project: Project, name: str,
                   kind: InputType, value: str, pinned: str | None) -> ResolvedInput:
    if kind is InputType.git:
        url, branch = _parse_git_value(value)
        return _fetch_git(settings, name, url, branch, pinned)
    if kind is InputType.boolean:
        lowered = value.strip().lower()
        if lowered not in ("true", "false", "1", "0"):
            raise InputError(f"input {name!r}: a boolean is true or false, got {value!r}")
        return ResolvedInput(name=name, type=kind.value,
                             value="true" if lowered in ("true", "1") else "false")
    if kind is InputType.path:
        path = Path(value)
        if not path.is_absolute() or not path.exists():
            raise InputError(f"input {name!r}: path {value!r} does not exist")
        store_path = _add_to_store(settings, path)
        return ResolvedInput(name=name, type=kind.value, value=value,
                             revision=Path(store_path).name.split("-", 1)[0],
                             store_path=store_path)
    if kind is InputType.build:
        return _resolve_build_input(session, name, value, project)
    # string and nix: the value is everything
    return ResolvedInput(name=name, type=kind.value, value=value)


def resolve(session: Session, settings: Settings, jobset: Jobset, *,
            branch: str | None = None, revision: str | None = None) -> Resolution:
    """Fetch and pin every input of ``jobset``; raise :class:`InputError`.

    ``branch``/``revision`` override the project repository's branch and pin its
    commit (pull-request evaluations).
    """
    project = jobset.project
    main: ResolvedInput | None = None
    inputs: list[ResolvedInput] = []
    if jobset.flake_mode or not jobset.nix_expression_input:
        if not project.repository_url:
            raise InputError(f"project {project.name!r} has no repository URL")
        main = _fetch_git(settings, "repository", project.repository_url,
                          branch or jobset.branch, revision)
    if not jobset.flake_mode:
        for item in jobset.inputs:
            inputs.append(_resolve_input(session, settings, project, item.name,
                                         item.input_type, item.value, item.revision))
        if jobset.nix_expression_input:
            source = next((i for i in inputs if i.name == jobset.nix_expression_input), None)
            if source is None:
                raise InputError(f"the expression input {jobset.nix_expression_input!r} "
                                 "is not one of the jobset's inputs")
            if source.type not in (InputType.git.value, InputType.path.value):
                raise InputError(f"the expression input {source.name!r} must be a git or "
                                 f"path input, not {source.type}")
    return Resolution(flake_mode=jobset.flake_mode, nix_expression=jobset.nix_expression,
                      expression_input=None if jobset.flake_mode
                      else jobset.nix_expression_input,
                      main=main, inputs=inputs)


def ensure_commit(settings: Settings, item: ResolvedInput) -> Mirror:
    """The local mirror of a git input, holding its pinned revision."""
    assert item.revision is not None
    mirror = mirror_for(settings, item.value.split()[0] if item.value else "")
    try:
        if not mirror.path.exists() or not mirror.has_commit(item.revision):
            mirror.fetch(item.branch)
        if not mirror.has_commit(item.revision):
            raise InputError(f"revision {item.revision} is no longer in {mirror.url}")
    except GitError as exc:
        raise InputError(str(exc)) from None
    return mirror


def checkout(settings: Settings, item: ResolvedInput) -> None:
    """Put the tree of a git input into the Nix store (``item.store_path``)."""
    assert item.revision is not None
    mirror = ensure_commit(settings, item)
    cache = Path(settings.evaluator.work_dir) / "checkouts" / item.revision
    if cache.exists():
        cached = cache.read_text().strip()
        if cached and Path(cached).exists():
            item.store_path = cached
            item.rev_count = mirror.rev_count(item.revision)
            return
    cache.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=cache.parent, prefix=".tmp-"))
    try:
        tree = scratch / "source"
        try:
            mirror.export(item.revision, tree)
        except GitError as exc:
            raise InputError(str(exc)) from None
        item.store_path = _add_to_store(settings, tree)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    cache.write_text(item.store_path)
    item.rev_count = mirror.rev_count(item.revision)


def materialise(settings: Settings, resolution: Resolution) -> None:
    """Classic jobsets: check out git inputs (and the expression source) into the store."""
    if resolution.flake_mode:
        return
    items = list(resolution.inputs)
    if resolution.main is not None:
        items.append(resolution.main)
    for item in items:
        if item.type == InputType.git.value:
            checkout(settings, item)


def classic_args(resolution: Resolution) -> tuple[list[ClassicArg], dict[str, str]]:
    """The function arguments and ``-I`` entries of a classic jobset."""
    args: list[ClassicArg] = []
    include: dict[str, str] = {}
    for item in resolution.inputs:
        if item.type == InputType.string.value:
            args.append(ClassicArg(item.name, "str", item.value))
        elif item.type in (InputType.boolean.value, InputType.nix.value):
            args.append(ClassicArg(item.name, "expr", item.value))
        else:
            assert item.store_path is not None
            include[item.name] = item.store_path
            args.append(ClassicArg(item.name, "expr", store_input_expr(item)))
    return args, include


def store_input_expr(item: ResolvedInput) -> str:
    fields = [f"outPath = builtins.storePath {nix_string(item.store_path or '')};",
              f"inputType = {nix_string(item.type)};"]
    if item.type == InputType.git.value and item.revision:
        fields += [f"uri = {nix_string(item.value.split()[0])};",
                   f"rev = {nix_string(item.revision)};",
                   f"shortRev = {nix_string(item.revision[:7])};",
                   f"revCount = {item.rev_count or 0};"]
    if item.type == InputType.build.value:
        if item.drv_path:
            fields.append(f"drvPath = {nix_string(item.drv_path)};")
        for name, path in sorted(item.outputs.items()):
            if name not in ("outPath", "drvPath", "inputType"):
                fields.append(f"{nix_string(name)} = {nix_string(path)};")
    return "{ " + " ".join(fields) + " }"
