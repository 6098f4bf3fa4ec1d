"""Machinery shared by Circus's config files (daemons and agent).

Layering (lowest first): built-in defaults < each TOML file given < environment
variables ``<PREFIX>SECTION__KEY``. Every secret field ``x`` also accepts
``x_file``, read at load time. Validation collects *every* problem with its key
path so an operator fixes a file in one go.

No SQLAlchemy here: the agent uses this module too.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from pydantic_core import PydanticCustomError


@dataclass(frozen=True)
class Problem:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ConfigError(Exception):
    """Raised with every problem found in a configuration."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems = list(problems)
        super().__init__(self.render())

    def render(self) -> str:
        lines = [f"invalid configuration ({len(self.problems)} problem(s)):"]
        lines += [f"  {p}" for p in self.problems]
        return "\n".join(lines)


class SettingsModel(BaseModel):
    """Base of every config section: frozen, unknown keys rejected, ``*_file`` secrets."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    #: fields that may be given as ``<name>_file`` (file contents, trailing newline stripped)
    secret_fields: ClassVar[tuple[str, ...]] = ()

    @model_validator(mode="before")
    @classmethod
    def _read_secret_files(cls, data: Any) -> Any:
        if not isinstance(data, Mapping) or not cls.secret_fields:
            return data
        data = dict(data)
        for name in cls.secret_fields:
            file_key = f"{name}_file"
            if file_key not in data:
                continue
            file_name = data.pop(file_key)
            if name in data and data[name] not in (None, ""):
                raise PydanticCustomError(
                    "secret_conflict", "{key}: give either {name} or {key}, not both",
                    {"key": file_key, "name": name},
                )
            try:
                content = Path(str(file_name)).read_text()
                field = cls.model_fields.get(name)
                if field is not None and get_origin(field.annotation) is list:
                    # list secrets (agent token digests) are one per line
                    data[name] = [line.strip() for line in content.splitlines()
                                  if line.strip() and not line.lstrip().startswith("#")]
                else:
                    data[name] = content.rstrip("\n")
            except OSError as exc:
                raise PydanticCustomError(
                    "secret_file", "{key}: cannot read {file} ({reason})",
                    {"key": file_key, "file": str(file_name), "reason": exc.strerror or str(exc)},
                ) from None
        return data

    def problems(self) -> list[Problem]:
        """Cross-field checks of this section; paths are relative to it."""
        return []


def between(low: float, high: float) -> Any:
    """An after-validator giving the range message operators expect."""

    def check(value: float) -> float:
        if not low <= value <= high:
            raise PydanticCustomError(
                "range", "must be between {low} and {high}", {"low": low, "high": high}
            )
        return value

    return check


def at_least(low: float) -> Any:
    def check(value: float) -> float:
        if value < low:
            raise PydanticCustomError("range", "must be at least {low}", {"low": low})
        return value

    return check


# ---------------------------------------------------------------------------
# loading

def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError([Problem("", f"config file {path} does not exist")]) from None
    except OSError as exc:
        raise ConfigError([Problem("", f"cannot read config file {path}: {exc}")]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([Problem("", f"{path}: not valid TOML ({exc})")]) from None


def deep_merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def env_overrides(environ: Mapping[str, str], prefix: str) -> dict[str, Any]:
    """``CIRCUS_QUEUE_RUNNER__RPC__BIND=x`` → ``{"queue_runner": {"rpc": {"bind": "x"}}}``.

    Only names with ``__`` are config keys (every setting lives in a section), so
    other ``CIRCUS_*`` variables (``CIRCUS_CONFIG_FILE``, ``CIRCUS_URL``) pass by.
    Values that look like JSON arrays or objects are parsed as JSON.
    """
    result: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(prefix) or "__" not in name[len(prefix):]:
            continue
        parts = [p.lower() for p in name[len(prefix):].split("__")]
        value: Any = raw
        if raw.strip().startswith(("[", "{")):
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                value = raw
        node = result
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                break
        else:
            node[parts[-1]] = value
    return result


_MESSAGES = {
    "extra_forbidden": "unknown key",
    "missing": "is required",
    "int_parsing": "must be an integer",
    "int_type": "must be an integer",
    "int_from_float": "must be an integer",
    "float_parsing": "must be a number",
    "float_type": "must be a number",
    "bool_parsing": "must be true or false",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "list_type": "must be a list",
    "dict_type": "must be a table",
    "model_type": "must be a table",
    "model_attributes_type": "must be a table",
}


def _format_input(value: Any) -> str:
    if isinstance(value, str):
        return repr(value) if len(value) < 80 else repr(value[:77] + "...")
    if isinstance(value, (int, float, bool)):
        return str(value).lower() if isinstance(value, bool) else str(value)
    return type(value).__name__


def problems_from_validation(exc: ValidationError, prefix: str) -> list[Problem]:
    problems = []
    for err in exc.errors():
        path = prefix
        for part in err["loc"]:
            if isinstance(part, int):
                path += f"[{part}]"
            else:
                path = f"{path}.{part}" if path else str(part)
        kind = err["type"]
        message = _MESSAGES.get(kind)
        if kind == "string_too_short":
            message = f"must be at least {err.get('ctx', {}).get('min_length')} characters long"
        elif kind == "string_too_long":
            message = f"must be at most {err.get('ctx', {}).get('max_length')} characters long"
        if message is None:
            message = err["msg"]
            for lead in ("Value error, ", "Assertion failed, "):
                message = message.removeprefix(lead)
            message = message.replace("Input should be", "must be")
        if kind in ("secret_file", "secret_conflict"):
            # raised by the table (before its fields): the key goes into the path
            key = err["ctx"]["key"]
            problems.append(Problem(f"{path}.{key}" if path else key,
                                    message.removeprefix(f"{key}: ")))
            continue
        if kind not in ("missing", "extra_forbidden", "model_type", "dict_type") and "input" in err:
            message = f"{message} (got {_format_input(err['input'])})"
        problems.append(Problem(path, message))
    return problems


ModelT = TypeVar("ModelT", bound=SettingsModel)


def collect_problems(model: SettingsModel, prefix: str) -> list[Problem]:
    """Run ``problems()`` on a validated model and every nested section."""
    found = [Problem(f"{prefix}.{p.path}" if prefix and p.path else prefix or p.path, p.message)
             for p in model.problems()]
    for name in type(model).model_fields:
        value = getattr(model, name)
        items: list[tuple[str, Any]]
        if isinstance(value, SettingsModel):
            items = [(name, value)]
        elif isinstance(value, (list, tuple)):
            items = [(f"{name}[{i}]", v) for i, v in enumerate(value)
                     if isinstance(v, SettingsModel)]
        else:
            continue
        for sub_name, sub in items:
            found += collect_problems(sub, f"{prefix}.{sub_name}" if prefix else sub_name)
    return found


def _problems_of_valid_parts(model_cls: type[SettingsModel], raw: Any, prefix: str
                             ) -> list[Problem]:
    """Cross-field problems of the nested tables of an invalid ``model_cls`` that
    validate on their own (their field errors are already in the parent's)."""
    if not isinstance(raw, Mapping):
        return []
    found: list[Problem] = []
    for name, field in model_cls.model_fields.items():
        if name not in raw:
            continue
        annotation = field.annotation
        values: list[tuple[str, Any]] = []
        sub_cls: type[SettingsModel] | None = None
        if isinstance(annotation, type) and issubclass(annotation, SettingsModel):
            sub_cls, values = annotation, [(f"{prefix}.{name}", raw[name])]
        elif get_origin(annotation) is list and isinstance(raw[name], list):
            (item,) = get_args(annotation) or (None,)
            if isinstance(item, type) and issubclass(item, SettingsModel):
                sub_cls = item
                values = [(f"{prefix}.{name}[{i}]", v) for i, v in enumerate(raw[name])]
        if sub_cls is None:
            continue
        for path, value in values:
            try:
                sub = sub_cls.model_validate(value)
            except ValidationError:
                found += _problems_of_valid_parts(sub_cls, value, path)
            else:
                found += collect_problems(sub, path)
    return found


def section_problems(model_cls: type[SettingsModel], raw: Any, exc: ValidationError,
                     prefix: str) -> list[Problem]:
    """The problems of an invalid table, ``exc`` being its validation error.

    An unreadable ``*_file`` secret stops the validation of its table (it is read before
    the fields are), so the table's other keys, its nested tables included, were not
    looked at: validate it again without that key, as often as there are such files,
    and report what else is wrong too (a typo beside a missing secret file was found
    only after the file was fixed)."""
    problems = problems_from_validation(exc, prefix)
    for _ in range(32):   # one unreadable file per table and pass; tables name few
        unreadable = [e for e in exc.errors() if e["type"] == "secret_file"]
        if not unreadable:
            break
        raw = copy.deepcopy(raw)
        for error in unreadable:
            node = raw
            for part in error["loc"]:
                node = node[part]
            node.pop(error["ctx"]["key"], None)
        try:
            model_cls.model_validate(raw)
        except ValidationError as again:
            exc = again
            problems += [p for p in problems_from_validation(again, prefix)
                         if p not in problems]
        else:
            break
    return problems


def validate_sections(model_cls: type[ModelT], raw: Mapping[str, Any]) -> ModelT:
    """Validate section by section so one broken section does not hide another's problems."""
    problems: list[Problem] = []
    sections: dict[str, Any] = {}
    for name in raw:
        if name not in model_cls.model_fields:
            problems.append(Problem(name, "unknown section"))
    for name, field in model_cls.model_fields.items():
        if name not in raw:
            continue
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, SettingsModel):
            try:
                sections[name] = annotation.model_validate(raw[name])
            except ValidationError as exc:
                problems += section_problems(annotation, raw[name], exc, name)
                # a bad key must not hide the checks of the section's tables that are
                # fine on their own (``queue_runner.workers`` and ``queue_runner.rpc``'s
                # token digests are fixed in one go)
                problems += _problems_of_valid_parts(annotation, raw[name], name)
            else:
                problems += collect_problems(sections[name], name)
        else:
            sections[name] = raw[name]
    if problems:
        raise ConfigError(problems)
    try:
        settings = model_cls.model_validate(sections)
    except ValidationError as exc:
        raise ConfigError(problems_from_validation(exc, "")) from None
    # sections were checked above; what is left are the cross-section rules
    problems = [Problem(p.path, p.message) for p in settings.problems()]
    if problems:
        raise ConfigError(problems)
    return settings


def load_host_program_settings(model_cls: type[ModelT], section: str,
                               files: list[Path] | None,
                               environ: Mapping[str, str] | None,
                               overrides: Mapping[str, Any] | None) -> ModelT:
    """Settings of a program that runs on a builder host (``circus-agent``,
    ``circus-worker``): defaults < the config file(s) (default: the one named by
    ``CIRCUS_<SECTION>_CONFIG_FILE``) < ``CIRCUS_<SECTION>__*`` and
    ``CIRCUS_TRACING__*`` variables < ``overrides``. Every section's problems are
    listed (:func:`validate_sections`)."""
    environ = os.environ if environ is None else environ
    file_variable = f"CIRCUS_{section.upper()}_CONFIG_FILE"
    if files is None:
        files = [Path(environ[file_variable])] if environ.get(file_variable) else []
    raw: dict[str, Any] = {}
    for path in files:
        raw = deep_merge(raw, read_toml(path))
    env = env_overrides(environ, "CIRCUS_")
    raw = deep_merge(raw, {name: env[name] for name in (section, "tracing") if name in env})
    if overrides:
        raw = deep_merge(raw, overrides)
    raw.setdefault(section, {})
    return validate_sections(model_cls, raw)


def host_program_arguments(program: str, description: str | None, section: str
                           ) -> argparse.ArgumentParser:
    """The command line every builder-host program takes (``--config``, ``--log-level``);
    the program adds its own options and reads its settings with
    :func:`settings_from_arguments`."""
    parser = argparse.ArgumentParser(prog=program, description=description)
    parser.add_argument("--config", type=Path, help=f"{section} config file "
                        f"(default: $CIRCUS_{section.upper()}_CONFIG_FILE)")
    parser.add_argument("--log-level", help="overrides tracing.level")
    return parser


@contextmanager
def exit_on_bad_config() -> Iterator[None]:
    """For a program's start: a :class:`ConfigError` raised inside is printed with every
    problem, and the program exits with status 2 (like argparse for a bad command line)."""
    try:
        yield
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        raise SystemExit(2) from None


def settings_from_arguments(args: argparse.Namespace, load: Callable[..., ModelT]) -> ModelT:
    """The settings of a builder-host program from its parsed command line, through its
    loader (built on :func:`load_host_program_settings`); a bad configuration ends the
    program (:func:`exit_on_bad_config`)."""
    with exit_on_bad_config():
        return load(files=[args.config] if args.config else None,
                    overrides={"tracing": {"level": args.log_level}} if args.log_level
                    else None)
