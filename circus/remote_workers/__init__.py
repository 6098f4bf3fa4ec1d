"""Build-only Celery workers on other hosts (``circus-worker``), server side."""
