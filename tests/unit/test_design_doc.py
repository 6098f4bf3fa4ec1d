"""docs/DESIGN.md's "Life of a build" names real functions.

The section names the function at every hop as ``module:function`` (or
``module:Class.method``); each name is imported here, so moving or renaming a
function without updating the walk-through fails the suite.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

DESIGN = Path(__file__).resolve().parents[2] / "docs" / "DESIGN.md"
SECTION = "## Life of a build"
#: `circus.module.path:Name` or `circus.module.path:Class.method`, in backticks
REFERENCE = re.compile(r"`(circus(?:\.\w+)+):(\w+(?:\.\w+)*)`")
#: the hops the section walks through, in order (its numbered items' bold titles)
HOPS = ["Trigger", "Evaluation", "Builds recorded", "Stepping", "Routing and wake-up",
        "Claim", "Build", "Finish step", "Finish build", "Publish to the cache",
        "Notification"]


def _section() -> str:
    text = DESIGN.read_text()
    start = text.index(SECTION + "\n")
    end = text.find("\n## ", start + len(SECTION))
    return text[start:end if end != -1 else len(text)]


def _resolve(module_name: str, attribute_path: str) -> object:
    found: object = importlib.import_module(module_name)
    for part in attribute_path.split("."):
        found = getattr(found, part)
    return found


def test_every_named_function_exists() -> None:
    references = REFERENCE.findall(_section())
    # the check must not pass because the pattern stopped matching the text
    assert len(references) >= 40, references
    missing = []
    for module_name, attribute_path in references:
        try:
            _resolve(module_name, attribute_path)
        except (ImportError, AttributeError) as exc:
            missing.append(f"{module_name}:{attribute_path} ({type(exc).__name__}: {exc})")
    assert not missing, "docs/DESIGN.md names what does not exist:\n" + "\n".join(missing)


def test_the_hops_are_in_order() -> None:
    titles = re.findall(r"^\d+\. \*\*(.+?)[.*]", _section(), re.M)
    assert [title.rstrip(".") for title in titles] == HOPS


def test_a_wrong_name_is_caught() -> None:
    # the resolver is what the first test relies on: it must reject a misspelt name
    for module_name, attribute_path in [("circus.queue_runner.steps.leases", "claim_step"),
                                        ("circus.queue_runner.no_such_module", "claim_steps")]:
        try:
            _resolve(module_name, attribute_path)
        except (ImportError, AttributeError):
            continue
        raise AssertionError(f"{module_name}:{attribute_path} resolved")
