"""The configuration as admins see it (secrets redacted) and the config editor's write.

Shared by ``/api/v1/admin/config`` and the dashboard's config page.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import replace as replace_dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from sqlalchemy.orm import Session

from circus import audit
from circus.auth.actor import Actor
from circus.auth.permissions import Action, require_permission
from circus.common.config import ConfigError, Settings, load_settings
from circus.common.configbase import SettingsModel, validate_sections
from circus.common.errors import Conflict, InvalidInput

REDACTED = "<redacted>"


def redact(model: BaseModel) -> dict[str, Any]:
    """The settings as JSON with every secret (and database URL) replaced."""
    out: dict[str, Any] = {}
    secret = model.secret_fields if isinstance(model, SettingsModel) else ()
    for name in type(model).model_fields:
        value = getattr(model, name)
        if name in secret and value:
            out[name] = REDACTED if not isinstance(value, list) else [REDACTED] * len(value)
        else:
            out[name] = _redact_value(value)
    return out


def _redact_value(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return redact(value)
    if isinstance(value, list):
        return [_redact_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _redact_value(v) for k, v in value.items()}
    if hasattr(value, "value") and not isinstance(value, bool | int | float | str):
        return value.value
    return value


def config_file() -> str | None:
    return os.environ.get("CIRCUS_CONFIG_FILE")


def replace(session: Session, actor: Actor, settings: Settings, toml_text: str
            ) -> dict[str, Any]:
    """Validate and write the configuration file, then apply its declarative part.

    Only when ``server.config_editor_enabled``; other settings take effect on restart.
    Callers commit.
    """
    require_permission(session, actor, Action.admin_access)
    if not settings.server.config_editor_enabled:
        raise Conflict("the configuration editor is disabled",
                       {"hint": "set server.config_editor_enabled = true"})
    path = config_file()
    if not path:
        raise Conflict("the server was started without CIRCUS_CONFIG_FILE; nothing to write")
    try:
        raw = tomllib.loads(toml_text)
        validate_sections(Settings, raw)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidInput("not valid TOML", {"toml": [str(exc)]}) from exc
    except ConfigError as exc:
        raise InvalidInput("invalid configuration",
                           {"toml": [str(p) for p in exc.problems]}) from exc
    target = Path(path)
    temporary = target.with_name(target.name + ".new")
    temporary.write_text(toml_text)
    from circus.declarative import apply_declarative

    # applied before the file is replaced: declared objects the services refuse leave
    # both the file and the database (the caller rolls back) as they were
    applier = replace_dataclass(Actor.system(f"declarative:{actor.label}"),
                                remote_addr=actor.remote_addr)
    try:
        summary = apply_declarative(session, load_settings(files=[temporary]), actor=applier)
    except ConfigError as exc:
        temporary.unlink(missing_ok=True)
        raise InvalidInput("invalid declarative configuration",
                           {"toml": [str(p) for p in exc.problems]}) from exc
    temporary.replace(target)
    audit.record(session, actor, "config.update", f"file:{target}")
    return {"written": str(target), "declarative": summary, "restart_required": True}
