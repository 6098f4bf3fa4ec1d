"""``circus-agent``: a build host daemon that dials the queue runner's gateway."""

from __future__ import annotations

import asyncio
import signal
import sys

from circus.common.configbase import host_program_arguments, settings_from_arguments
from circus.common.logging import setup_logging


def main(argv: list[str] | None = None) -> int:
    parser = host_program_arguments("circus-agent", __doc__, "agent")
    parser.add_argument("--ephemeral", action="store_true",
                        help="fresh identity, unique name, stop after the configured limits")
    args = parser.parse_args(argv)
    from circus.agent.config import load_agent_settings

    settings = settings_from_arguments(args, load_agent_settings)
    setup_logging(settings.tracing)
    import capnp

    from circus.agent.daemon import Agent

    async def run() -> int:
        agent = Agent(settings.agent, ephemeral=True if args.ephemeral else None)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, agent.request_stop, f"signal {sig.name}")
        return await agent.run()

    return int(asyncio.run(capnp.run(run())))


if __name__ == "__main__":
    sys.exit(main())
