"""Fixtures of the binary-cache tests: signing keys made by Nix itself, settings."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from circus.common.config import Settings
from tests.conftest import KeyPair


@pytest.fixture
def cache_settings(make_settings: Callable[..., Settings], cache_key: KeyPair
                   ) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        sections: dict[str, Any] = {"signing": {"enabled": True, "key": cache_key.secret}}
        for section, values in overrides.items():
            sections.setdefault(section, {}).update(values)
        return make_settings(**sections)

    return make
