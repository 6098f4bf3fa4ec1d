"""The metric names monitoring relies on (the metrics test and the alert rules)."""

#: every metric SPEC §"Observability" names, with its Prometheus type
SPEC_METRICS = {
    "circus_queue_depth": "gauge",  # per system/feature class
    "circus_steps": "gauge",  # runnable / running steps
    "circus_builds": "gauge",  # builds by status
    "circus_evaluations_total": "counter",  # evaluator errors
    "circus_evaluation_duration_seconds": "histogram",
    "circus_agents_connected": "gauge",
    "circus_agent_load1": "gauge",
    "circus_cache_requests_total": "counter",  # hits and misses
    "circus_cache_served_bytes_total": "counter",
    "circus_cache_errors_total": "counter",
    "circus_notification_backlog": "gauge",
    "circus_daemon_heartbeat_age_seconds": "gauge",
    "circus_http_request_duration_seconds": "histogram",  # prometheus-flask-exporter
}
