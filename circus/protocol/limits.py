"""Size limits of protocol fields (SPEC §5), enforced on both sides."""

from __future__ import annotations

from collections.abc import Iterable

MAX_NAME = 128
MAX_HOSTNAME = 255
MAX_TOKEN = 4096
MAX_SYSTEMS = 32
MAX_FEATURES = 128
MAX_FEATURE_LEN = 128
MAX_STORE_PATH = 4096
MAX_PRESIGN_REQUESTS = 128
MAX_LOG_CHUNK = 1024 * 1024
#: largest Cap'n Proto message we accept (words of 8 bytes): a log chunk plus headroom
TRAVERSAL_LIMIT_WORDS = (MAX_LOG_CHUNK * 2) // 8


class LimitExceeded(ValueError):
    pass


def check_text(field: str, value: str, limit: int) -> str:
    if len(value) > limit:
        raise LimitExceeded(f"{field} is longer than {limit} characters")
    return value


def check_list(field: str, values: Iterable[str], count: int, each: int) -> list[str]:
    items = list(values)
    if len(items) > count:
        raise LimitExceeded(f"{field} has more than {count} entries")
    for item in items:
        check_text(f"{field} entry", item, each)
    return items


def check_agent_info(name: str, hostname: str, token: str, systems: Iterable[str],
                     supported: Iterable[str], mandatory: Iterable[str]) -> None:
    check_text("name", name, MAX_NAME)
    check_text("hostname", hostname, MAX_HOSTNAME)
    check_text("authToken", token, MAX_TOKEN)
    check_list("systems", systems, MAX_SYSTEMS, MAX_NAME)
    check_list("supportedFeatures", supported, MAX_FEATURES, MAX_FEATURE_LEN)
    check_list("mandatoryFeatures", mandatory, MAX_FEATURES, MAX_FEATURE_LEN)
