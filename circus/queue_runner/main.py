"""``circus-queue-runner``: dispatcher, reconciler, local build workers, SSH builders and,
with ``queue_runner.rpc.bind``, the agent gateway."""

from __future__ import annotations

import argparse
import sys

from circus.common.config import load_settings
from circus.common.configbase import exit_on_bad_config
from circus.common.daemon_exit import exit_after_shutdown
from circus.common.logging import setup_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="circus-queue-runner", description=__doc__)
    parser.add_argument("--workers", type=int, default=None,
                        help="local build slots (default: queue_runner.workers; 0: none)")
    parser.add_argument("--no-dispatcher", action="store_true",
                        help="build only; another process dispatches")
    parser.add_argument("--no-ssh-builders", action="store_true",
                        help="do not build on remote_builders (another process does)")
    parser.add_argument("--name", default=None,
                        help="instance name when one host runs several queue runners")
    args = parser.parse_args(argv)
    with exit_on_bad_config():
        settings = load_settings()
        settings.require_database_url()
        settings.require_broker_url()
    setup_logging(settings.tracing)
    from circus.queue_runner.daemon import ConsumerFactory, QueueRunner

    consumers: list[ConsumerFactory] = []
    if settings.queue_runner.rpc.bind:
        # this entry point wires the process together: the daemon never imports the
        # gateway, the gateway uses the queue runner's step services
        from circus.gateway.consumer import AgentGateway

        consumers.append(AgentGateway)
    runner = QueueRunner(settings, dispatcher=not args.no_dispatcher, workers=args.workers,
                         name=args.name, ssh_builders=not args.no_ssh_builders,
                         consumers=consumers)
    # run() returns once its shutdown has stopped everything (an exception keeps the
    # usual exit and its traceback)
    return exit_after_shutdown(runner.run())


if __name__ == "__main__":
    sys.exit(main())
