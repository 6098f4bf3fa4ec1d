"""Dashboard views, one module per area (importing them registers the routes)."""

from circus.server.dashboard.views import (  # noqa: F401
    account,
    admin,
    builds,
    evaluations,
    home,
    projects,
    system,
)
