"""Count every transition of a build or step into a finished state (double-finish checks).

The schema keeps only a row's current state, so a build finished twice (or a step
built twice) would leave no trace; these triggers log each transition into
``qr_test_finishes`` while a test runs.
"""

from __future__ import annotations

import time

from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import OperationalError

INSTALL = """
    CREATE TABLE qr_test_finishes (kind text, id bigint, status smallint, by text);
    CREATE FUNCTION qr_test_build_finished() RETURNS trigger AS $$
    BEGIN INSERT INTO qr_test_finishes VALUES ('build', NEW.id, NEW.status, NEW.machine);
          RETURN NEW; END $$ LANGUAGE plpgsql;
    CREATE FUNCTION qr_test_step_finished() RETURNS trigger AS $$
    BEGIN INSERT INTO qr_test_finishes VALUES ('step', NEW.id, NEW.status, NEW.worker);
          RETURN NEW; END $$ LANGUAGE plpgsql;
    CREATE TRIGGER qr_test_build_finished AFTER UPDATE OF status ON builds FOR EACH ROW
        WHEN (OLD.status IN (0, 1) AND NEW.status NOT IN (0, 1))
        EXECUTE FUNCTION qr_test_build_finished();
    CREATE TRIGGER qr_test_step_finished AFTER UPDATE OF state ON steps FOR EACH ROW
        WHEN (OLD.state <> 'done' AND NEW.state = 'done')
        EXECUTE FUNCTION qr_test_step_finished();
"""

REMOVE = """
    DROP TRIGGER IF EXISTS qr_test_build_finished ON builds;
    DROP TRIGGER IF EXISTS qr_test_step_finished ON steps;
    DROP FUNCTION IF EXISTS qr_test_build_finished();
    DROP FUNCTION IF EXISTS qr_test_step_finished();
    DROP TABLE IF EXISTS qr_test_finishes;
"""


def install_finish_audit(engine: Engine) -> None:
    """Install the triggers; daemons already running may hold the tables' locks in the
    other order, and PostgreSQL then fails one side of the cycle, possibly ours: again."""
    for attempt in range(10):
        try:
            with engine.begin() as conn:
                conn.execute(text(INSTALL))
            return
        except OperationalError as exc:
            if "deadlock detected" not in str(exc) or attempt == 9:
                raise
            time.sleep(0.2)


def remove_finish_audit(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(text(REMOVE))


def finish_counts(conn: Connection, kind: str) -> dict[int, int]:
    """Per build (``kind="build"``) or step id: how often it went into a finished state."""
    rows = conn.execute(text(
        "SELECT id, count(*) FROM qr_test_finishes WHERE kind = :k GROUP BY id"),
        {"k": kind}).tuples().all()
    return {int(i): int(n) for i, n in rows}
