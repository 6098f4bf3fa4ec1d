"""The example alerting rules load in Prometheus and fire when they should."""

from __future__ import annotations

from pathlib import Path

from tests.helpers.promtool import promtool
from tests.operations.metric_names import SPEC_METRICS

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "deploy" / "prometheus" / "circus-alerts.yml"
#: promtool's unit tests of the rules (input series, expected alerts)
RULE_TESTS = Path(__file__).parent / "circus-alerts.test.yml"


def test_alert_rules_pass_promtool_check_and_their_unit_tests() -> None:
    checked = promtool("check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 9 rules found" in checked.stdout
    tested = promtool("test", "rules", str(RULE_TESTS))
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_every_metric_an_alert_reads_is_one_the_server_exports() -> None:
    rules = RULES.read_text()
    read = {name for name in SPEC_METRICS if name in rules}
    assert read >= {"circus_steps", "circus_builds", "circus_evaluations_total",
                    "circus_agents_connected", "circus_cache_errors_total",
                    "circus_notification_backlog", "circus_daemon_heartbeat_age_seconds"}
