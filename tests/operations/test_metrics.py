"""``/metrics`` of a real ``circus-server`` (gunicorn, two workers), checked by promtool."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import requests
from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import Session, sessionmaker

from circus.auth.actor import Actor
from circus.auth.service import create_api_key
from circus.cache.publish import publish_outputs
from circus.common.config import Settings
from circus.common.enums import EvaluationStatus, NotificationType, Role, TriggerKind
from circus.common.heartbeat import beat
from circus.common.models import Evaluation, NotificationTask, PendingPostprocessing
from circus.server.counters import Tally, read_counters
from tests.cache.support import make_build, nix_build, simple_expr
from tests.helpers.daemons import cache_server, wait_until
from tests.helpers.net import wait_for_http
from tests.helpers.promtool import metric_types, promtool
from tests.operations.metric_names import SPEC_METRICS


def test_metrics_after_an_evaluation_a_build_and_cache_traffic_pass_promtool(
        committed_db: sessionmaker[Session], cache_settings: Callable[..., Settings],
        database_url: str, redis_url: str, tmp_path: Path, nonce: str) -> None:
    settings = cache_settings()
    built = nix_build(simple_expr(nonce))
    with committed_db.begin() as session:
        build = make_build(session, built)
        publish_outputs(session, settings, build.id)
        # what the evaluator writes when an evaluation ends (eval_time in seconds)
        build.evaluation.eval_time = 12.5
        session.add(Evaluation(jobset_id=build.jobset_id, trigger_kind=TriggerKind.manual,
                               status=EvaluationStatus.failed, eval_time=0.4))
        session.add(NotificationTask(type=NotificationType.webhook, payload={}))
        _, secret = create_api_key(session, Actor.system("test"), name="scraper",
                                   role=Role.admin)
        # a build whose post-processing failed twice
        session.add(PendingPostprocessing(build_id=build.id, attempts=2,
                                          not_before=datetime.now(UTC)))
        beat(session, "evaluator", service="evaluator@test")
    daemon, port = cache_server(tmp_path, database_url=database_url, redis_url=redis_url,
                                cache_dir=settings.cache.cache_dir, workers=2)
    with daemon:
        base = f"http://127.0.0.1:{port}"
        wait_for_http(f"{base}/nix-cache/nix-cache-info", timeout=60)
        hash_part = Path(built.outputs["out"]).name[:32]
        # a hit through Flask, then (per worker) from the fast path; HEAD sends no body
        narinfo = [requests.get(f"{base}/nix-cache/{hash_part}.narinfo", timeout=10)
                   for _ in range(2)]
        assert [r.status_code for r in narinfo] == [200, 200]
        assert requests.head(f"{base}/nix-cache/{hash_part}.narinfo",
                             timeout=10).status_code == 200
        for _ in range(2):
            assert requests.get(f"{base}/nix-cache/{'0' * 32}.narinfo",
                                timeout=10).status_code == 404
        url = next(line.split(": ")[1] for line in narinfo[0].text.splitlines()
                   if line.startswith("URL:"))
        nar = requests.get(f"{base}/nix-cache/{url}", timeout=10)
        assert nar.status_code == 200
        assert requests.get(f"{base}/nix-cache/nar/{'1' * 52}.nar.xz",
                            timeout=10).status_code == 404

        def scrape() -> str:
            return requests.get(f"{base}/metrics", timeout=10,
                                headers={"Authorization": f"Bearer {secret}"}).text

        # each worker adds its counts to the database within ten seconds; a scrape,
        # whichever worker answers it, reports the sum
        expected_cache = [
            'circus_cache_requests_total{kind="narinfo",result="hit"} 3.0',
            'circus_cache_requests_total{kind="narinfo",result="miss"} 2.0',
            'circus_cache_requests_total{kind="nar",result="hit"} 1.0',
            'circus_cache_requests_total{kind="nar",result="miss"} 1.0',
            f'circus_cache_served_bytes_total{{kind="narinfo"}} {2.0 * len(narinfo[0].content)}',
            f'circus_cache_served_bytes_total{{kind="nar"}} {float(len(nar.content))}',
        ]
        wait_until(lambda: all(line in scrape().splitlines() for line in expected_cache),
                   timeout=30, interval=1, message="cache counts of both workers")
        exposition = scrape()

    checked = promtool("check", "metrics", stdin=exposition)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    types = metric_types(exposition)
    assert {name: types.get(name) for name in SPEC_METRICS} == SPEC_METRICS
    lines = exposition.splitlines()
    assert 'circus_builds{status="succeeded"} 1.0' in lines
    assert 'circus_evaluations_total{status="failed"} 1.0' in lines
    assert 'circus_evaluations_total{status="completed"} 1.0' in lines
    assert 'circus_evaluation_duration_seconds_bucket{le="1.0"} 1.0' in lines
    assert 'circus_evaluation_duration_seconds_bucket{le="5.0"} 1.0' in lines
    assert 'circus_evaluation_duration_seconds_bucket{le="15.0"} 2.0' in lines
    assert 'circus_evaluation_duration_seconds_bucket{le="+Inf"} 2.0' in lines
    assert 'circus_evaluation_duration_seconds_count 2.0' in lines
    assert 'circus_evaluation_duration_seconds_sum 12.9' in lines
    assert 'circus_notification_backlog{status="pending"} 1.0' in lines
    assert 'circus_postprocessing_pending{state="waiting"} 0.0' in lines
    assert 'circus_postprocessing_pending{state="retrying"} 1.0' in lines
    ages = [line for line in lines if line.startswith("circus_daemon_heartbeat_age_seconds{")]
    assert len(ages) == 1, ages
    assert ages[0].startswith(
        'circus_daemon_heartbeat_age_seconds{kind="evaluator",service="evaluator@test"}')
    assert 0 < float(ages[0].split()[-1]) < 300


def test_counts_survive_an_unreachable_database_and_add_up(
        committed_db: sessionmaker[Session], engine: Engine) -> None:
    tally = Tally(create_engine("postgresql+psycopg2://circus@127.0.0.1:1/nowhere"))
    tally.add("cache_requests:nar:hit")
    tally.add("cache_bytes:nar", 100)
    tally.flush()  # refused: kept for the next flush
    tally.add("cache_bytes:nar", 20)
    tally.engine = engine
    tally.flush()
    tally.add("cache_requests:nar:hit")
    tally.flush()
    with committed_db() as session:
        assert read_counters(session, "cache_") == {"cache_requests:nar:hit": 2,
                                                    "cache_bytes:nar": 120}
        assert read_counters(session, "cache_bytes:") == {"cache_bytes:nar": 120}
