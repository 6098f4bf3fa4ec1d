"""Run the gateway's event loop in a thread of the queue-runner daemon."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from circus.common.config import Settings
from circus.gateway.server import Gateway

log = logging.getLogger(__name__)


class GatewayThread(threading.Thread):
    """Owns the asyncio + KJ loop; ``started`` is set once the port is open."""

    def __init__(self, settings: Settings, session_factory: sessionmaker[Session],
                 alongside: Callable[[Gateway], Awaitable[Any]] | None = None) -> None:
        super().__init__(name="agent-gateway", daemon=True)
        bind = settings.queue_runner.rpc.bind or "127.0.0.1:0"
        host, _, port = bind.rpartition(":")
        self.host, self.port_wanted = host.strip("[]"), int(port)
        self.gateway = Gateway(settings, session_factory)
        self.alongside = alongside
        self.started = threading.Event()
        self.failed: BaseException | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None

    def run(self) -> None:
        import capnp

        try:
            asyncio.run(capnp.run(self._main()))
        except BaseException as exc:  # surfaced to whoever waits on `started`
            self.failed = exc
            log.exception("agent gateway stopped")
            self.started.set()

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        await self.gateway.serve(self.host, self.port_wanted)
        alongside_task = (asyncio.ensure_future(self.alongside(self.gateway))
                          if self.alongside else None)
        self.started.set()
        await self._stop_event.wait()
        if alongside_task is not None:
            alongside_task.cancel()
        for agent in list(self.gateway.agents.values()):
            await self.gateway.drop(agent)
        assert self.gateway.server is not None
        self.gateway.server.close()

    @property
    def port(self) -> int:
        return self.gateway.port

    def stop(self, timeout: float = 10) -> None:
        if self.loop is not None and self._stop_event is not None:
            self.loop.call_soon_threadsafe(self._stop_event.set)
        self.join(timeout)

    def call(self, coroutine: Awaitable[Any], timeout: float = 30) -> Any:
        """Run a coroutine on the gateway's loop from another thread."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)  # type: ignore[arg-type]
