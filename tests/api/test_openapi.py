"""The served OpenAPI document: fuzzed with schemathesis (no 5xx, responses match it),
and the committed docs/API.md matches it."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import schemathesis
from flask import Flask
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from circus.cli.admin import apidocs
from circus.common.enums import BuildStatus, InputType
from circus.common.models import Channel, JobsetInput
from tests.api.conftest import Keys, World

REPO = Path(__file__).resolve().parents[2]


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]
#: examples per operation and mode: the whole run must stay well under a minute
EXAMPLES = {GenerationMode.POSITIVE: 8, GenerationMode.NEGATIVE: 4}


#: operations backed by the evaluator and queue-runner services (tested after their merge,
#: in test_actions_pending_merge.py)
PENDING_MERGE = frozenset({
    "POST /api/v1/evaluations/trigger", "POST /api/v1/evaluations/{evaluation_id}/cancel",
    "GET /api/v1/evaluations/{evaluation_id}/compare", "POST /api/v1/builds/{build_id}/cancel",
    "POST /api/v1/builds/{build_id}/restart", "POST /api/v1/builds/{build_id}/bump",
    "PUT /api/v1/builds/{build_id}/keep/{keep}"})


def seed(world: World, keys: Keys) -> dict[str, Any]:
    """One object of each kind, so fuzzed requests also reach real rows, not only 404s."""
    project = world.project("seed")
    jobset = world.jobset(project)
    evaluation = world.evaluation(jobset)
    build = world.build(evaluation, "job", BuildStatus.failed,
                        outputs={"out": "/nix/store/" + "a" * 32 + "-job"})
    user = keys.user("seeduser")
    row = JobsetInput(jobset_id=jobset.id, name="src", input_type=InputType.string, value="v")
    channel = Channel(project_id=project.id, jobset_id=jobset.id, name="seedchan")
    world.db.add_all([row, channel])
    world.db.commit()
    return {"project": "seed", "jobset": "main", "input_name": "src", "channel": "seedchan",
            "build_id": build.id, "evaluation_id": evaluation.id, "user_id": user.id}


def fuzz(app: Flask, world: World, keys: Keys, wanted: Callable[[str], bool]) -> int:
    """Feed matching operations valid and invalid input; returns how many were fuzzed.

    Each operation runs in a savepoint rolled back afterwards, so a fuzzed DELETE
    cannot hide the seeded rows from later operations. Runs schemathesis through
    hypothesis directly (its pytest plugin does not support this pytest); failures
    of all operations are collected and reported together.
    """
    seeded = seed(world, keys)
    headers = keys.headers(name="fuzzer")
    schema = schemathesis.openapi.from_wsgi("/api/v1/openapi.json", app)
    failures: list[str] = []
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        if not wanted(operation.label):
            continue
        operations += 1
        names = re.findall(r"{(\w+)}", operation.path)
        pinned = {name: seeded[name] for name in names if name in seeded}
        runs: list[tuple[str, Any]] = [
            (mode.value, operation.as_strategy(generation_mode=mode)) for mode in EXAMPLES]
        if pinned:
            runs.append(("seeded", operation.as_strategy(path_parameters=pinned)))
        for label, strategy in runs:
            @given(case=strategy)
            @settings(max_examples=EXAMPLES[GenerationMode(label)]
                      if label != "seeded" else 6, deadline=None, derandomize=True,
                      database=None, suppress_health_check=list(HealthCheck),
                      phases=[Phase.generate])
            def run(case: schemathesis.Case) -> None:
                case.call_and_validate(headers=headers, checks=CHECKS)

            savepoint = world.db.connection().begin_nested()
            try:
                run()
            except BaseException as exc:  # a FailureGroup; collect every operation's
                if isinstance(exc, KeyboardInterrupt | SystemExit):
                    raise
                failures.append(f"{operation.label} [{label}]: {exc}"[:2000])
            finally:
                savepoint.rollback()
    assert failures == []
    return operations


def test_api_conforms_to_its_openapi_document(app: Flask, world: World, keys: Keys) -> None:
    """Every operation, valid and invalid input: never a 5xx, always the documented shape."""
    assert fuzz(app, world, keys, lambda label: label not in PENDING_MERGE) > 55


def test_api_md_is_generated_from_the_document() -> None:
    problems = apidocs.check(REPO / "docs" / "API.md")
    assert problems == []


def test_every_api_route_is_documented() -> None:
    assert apidocs.undocumented_routes() == []
