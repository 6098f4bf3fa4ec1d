"""``circus-agent``: a build host daemon that dials the queue runner's gateway."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

from circus.common.configbase import ConfigError
from circus.common.logging import setup_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="circus-agent", description=__doc__)
    parser.add_argument("--config", type=Path, help="agent config file "
                        "(default: $CIRCUS_AGENT_CONFIG_FILE)")
    parser.add_argument("--ephemeral", action="store_true",
                        help="fresh identity, unique name, stop after the configured limits")
    parser.add_argument("--log-level", help="overrides tracing.level")
    args = parser.parse_args(argv)
    from circus.agent.config import load_agent_settings

    try:
        settings = load_agent_settings(
            files=[args.config] if args.config else None,
            overrides={"tracing": {"level": args.log_level}} if args.log_level else None)
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        return 2
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
