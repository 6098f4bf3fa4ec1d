"""What every page's layout needs: who is looking, which pages they may open."""

from __future__ import annotations

from typing import Any

from circus import __version__
from circus.auth.actor import Actor
from circus.common.errors import CircusError
from circus.server.auth import current_actor
from circus.server.context import settings
from circus.server.dashboard.access import may_view
from circus.server.dashboard.blueprint import blueprint

#: the navigation bar: (page, endpoint, label)
NAVIGATION = (
    ("home", "dashboard.home", "Home"),
    ("projects", "dashboard.projects", "Projects"),
    ("channels", "dashboard.channels", "Channels"),
    ("queue", "dashboard.queue", "Queue"),
    ("machines", "dashboard.machines", "Machines"),
    ("metrics", "dashboard.metrics", "Metrics"),
    ("news", "dashboard.news", "News"),
)


def viewer() -> Actor:
    """The caller, or anonymous when even that cannot be told (a revoked key on an
    error page must not fail the error page too)."""
    try:
        return current_actor()
    except CircusError:
        return Actor.anonymous()


@blueprint.context_processor
def layout_context() -> dict[str, Any]:
    actor = viewer()
    return {
        "viewer": actor,
        "can_view": lambda page: may_view(actor, page),
        "navigation": [(endpoint, label) for page, endpoint, label in NAVIGATION
                       if may_view(actor, page)],
        "circus_version": __version__,
        "server_settings": settings().server,
    }
