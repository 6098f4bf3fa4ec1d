"""circus-server: REST API, dashboard, binary cache, webhooks, metrics, health."""
