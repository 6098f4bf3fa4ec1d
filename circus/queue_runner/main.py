"""``circus-queue-runner`` (skeleton: heartbeat only until the dispatcher lands)."""

from __future__ import annotations

import signal
import sys
import threading

from circus.common.config import ConfigError, load_settings
from circus.common.db import make_engine, make_session_factory
from circus.common.heartbeat import HeartbeatThread
from circus.common.logging import setup_logging


def main(argv: list[str] | None = None) -> int:
    try:
        settings = load_settings()
        settings.require_database_url()
    except ConfigError as exc:
        print(exc.render(), file=sys.stderr)
        return 2
    setup_logging(settings)
    factory = make_session_factory(make_engine(settings, application_name="circus-queue-runner"))
    heartbeat = HeartbeatThread(factory, "queue-runner")
    heartbeat.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    heartbeat.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
