"""``circus-worker``: a build-only Celery worker on another host (own Nix store, no
database password; claims and results go through the server's /api/v1/workers)."""
