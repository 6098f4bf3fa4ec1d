"""The agent gateway as one consumer of the queue runner's class queues.

``circus-queue-runner`` runs it when ``queue_runner.rpc.bind`` is set: the
gateway's server thread, the bridge that hands steps to connected agents, the
GitHub Actions autoscaler and the wake-up consumer for the classes agents
serve. The dependency goes one way: the gateway uses the queue runner's step
services (``steps``, ``routing``) like the SSH pool does, and the daemon never
imports the gateway — its entry point (``queue_runner.main``) hands
:class:`AgentGateway` to ``QueueRunner`` as a consumer factory.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from circus.common.config import Settings
from circus.gateway.autoscale import Autoscaler
from circus.gateway.bridge import Bridge
from circus.gateway.runtime import GatewayThread
from circus.gateway.server import Gateway
from circus.queue_runner.routing.wakeups import Publish, WakeupConsumer
from circus.queue_runner.steps.outcomes import FinishReport

#: how long the daemon waits for the gateway's port to open before giving up
START_TIMEOUT_SECS = 30.0


class AgentGateway:
    """Agents as consumers of the class queues, started and stopped with the daemon."""

    name = "gateway"

    def __init__(self, settings: Settings, session_factory: sessionmaker[Session], *,
                 publish: Publish | None,
                 on_built: Callable[[FinishReport], None] | None) -> None:
        self.thread = GatewayThread(settings, session_factory, alongside=self._alongside)
        self.bridge = Bridge(self.thread.gateway, settings, publish, on_built)
        # GitHub Actions pools: launch agents when their queued work needs them
        self.autoscaler = (Autoscaler(self.thread.gateway, settings)
                           if settings.queue_runner.ephemeral_pools else None)
        self.wakeups = WakeupConsumer(self.bridge, settings.require_broker_url(),
                                      name="agent-wakeups")

    async def _alongside(self, gateway: Gateway) -> None:
        """What runs on the gateway's loop next to the server: the bridge, autoscaling."""
        work = [self.bridge.run()]
        if self.autoscaler is not None:
            work.append(self.autoscaler.run())
        await asyncio.gather(*work)

    def start(self) -> None:
        self.thread.start()
        if not self.thread.started.wait(START_TIMEOUT_SECS) or self.thread.failed is not None:
            raise RuntimeError(f"the agent gateway did not start: {self.thread.failed}")
        self.wakeups.start()

    def stop(self) -> None:
        self.wakeups.stop()
        # hands every agent's in-flight steps back to the queue
        self.thread.stop()

    def details(self) -> dict[str, Any]:
        server = self.thread.gateway.server
        # no port before the server listens nor after it closed (the last heartbeat is
        # written during shutdown)
        serving = server is not None and bool(server.sockets)
        return {"port": self.thread.port if serving else None,
                "agents": len(self.thread.gateway.agents),
                "assigned": self.bridge.assigned}
