"""Build, step and evaluation statuses as SQL literals and the fragments built on them.

Raw SQL never spells a bare status: it interpolates these names, so a reader sees
``status IN {UNFINISHED}`` and the values live in one place (the enums), and a
condition written in several queries ("every dependency succeeded") is written once.
"""

from __future__ import annotations

from circus.common.enums import BuildStatus, EvaluationStatus


def literal(status: BuildStatus) -> str:
    return str(int(status))


def one_of(*statuses: BuildStatus) -> str:
    return "(" + ", ".join(literal(status) for status in statuses) + ")"


PENDING = literal(BuildStatus.pending)
RUNNING = literal(BuildStatus.running)
SUCCEEDED = literal(BuildStatus.succeeded)
FAILED = literal(BuildStatus.failed)
#: a build still to be decided (queued or building)
UNFINISHED = one_of(BuildStatus.pending, BuildStatus.running)
#: finished builds whose outputs exist (worth a GC root)
WITH_OUTPUTS = one_of(BuildStatus.succeeded, BuildStatus.failed_with_output)


# -- evaluations (a text enum: quoted literals)

def evaluation_literal(status: EvaluationStatus) -> str:
    return f"'{status.value}'"


def evaluation_one_of(*statuses: EvaluationStatus) -> str:
    return "(" + ", ".join(evaluation_literal(status) for status in statuses) + ")"


EVALUATION_PENDING = evaluation_literal(EvaluationStatus.pending)
EVALUATION_COMPLETED = evaluation_literal(EvaluationStatus.completed)
#: an evaluation still to be decided (at most one per jobset: a partial unique index)
EVALUATION_ACTIVE = evaluation_one_of(EvaluationStatus.pending, EvaluationStatus.running)
#: evaluations that ended without a complete set of builds
EVALUATION_UNSUCCESSFUL = evaluation_one_of(EvaluationStatus.failed, EvaluationStatus.cancelled,
                                            EvaluationStatus.timed_out)


# -- steps

def step_succeeded(step: str) -> str:
    """The step ``step`` (an alias of ``steps``) was built, or found, successfully."""
    return f"({step}.state = 'done' AND {step}.status = {SUCCEEDED})"


def dependencies_succeeded(step: str, *, or_held: str | None = None) -> str:
    """Every dependency of the step ``step`` (an alias of ``steps``) succeeded: it may
    be queued. ``or_held``: an SQL array of step ids that count as succeeded too
    (dependencies claimed in the same batch, built before their dependents)."""
    held = f" AND NOT (dependency.id = ANY({or_held}))" if or_held else ""
    return f"""NOT EXISTS (
        SELECT 1 FROM step_dependencies edge JOIN steps dependency
            ON dependency.id = edge.depends_on_id
        WHERE edge.step_id = {step}.id AND NOT {step_succeeded("dependency")}{held})"""
