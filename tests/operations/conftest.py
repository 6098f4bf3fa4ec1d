"""Operating Circus: what monitoring reads (metrics, alert rules, Flower) and deploy examples."""

from __future__ import annotations

from tests.cache.conftest import cache_settings  # noqa: F401  (shared fixture)
