"""``circus-server``: the web application under gunicorn (or Flask's server with --dev)."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from circus.common.config import SERVER_THREADS, load_settings
from circus.common.configbase import exit_on_bad_config
from circus.common.daemon_exit import exit_after_shutdown
from circus.common.logging import setup_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="circus-server", description=__doc__)
    parser.add_argument("--host", help="overrides server.host")
    parser.add_argument("--port", type=int, help="overrides server.port")
    parser.add_argument("--dev", action="store_true", help="Flask's development server")
    parser.add_argument("--skip-declarative", action="store_true",
                        help="do not apply [declarative] at start")
    args = parser.parse_args(argv)
    with exit_on_bad_config():
        settings = load_settings()
    setup_logging(settings.tracing)
    from circus.server.app import create_app

    if not args.skip_declarative:
        from circus.common.errors import CircusError
        from circus.declarative import apply_settings

        try:
            # before workers fork: one applier, and no inherited connections
            with exit_on_bad_config():
                apply_settings(settings)
        except CircusError as exc:
            print(f"error in [declarative]: {exc.message}", file=sys.stderr)
            return 2
    host = args.host or settings.server.host
    port = args.port if args.port is not None else settings.server.port
    app = create_app(settings)
    if args.dev:
        app.run(host=host, port=port, threaded=True)
        return 0

    from gunicorn.app.base import BaseApplication

    from circus.server.context import server_context
    from circus.server.httpworker import WORKER_CLASS
    from circus.server.warmup import open_first_connection, warm_up

    warm_up(app)

    def post_fork(server: Any, worker: Any) -> None:
        # A pooled connection opened before the fork would be shared by every worker:
        # two processes talking over one socket corrupt each other's results
        # ("error with status PGRES_TUPLES_OK and no message from the libpq").
        engine = server_context(app).engine
        engine.dispose(close=False)
        open_first_connection(engine)

    def worker_exit(server: Any, worker: Any) -> None:
        # gunicorn calls this in a worker's last ``finally``, with the worker's
        # SystemExit in flight; a clean stop leaves out the heap's teardown (the
        # app's heap, inherited from the master: seconds under load)
        leaving = sys.exc_info()[1]
        if isinstance(leaving, SystemExit) and leaving.code in (0, None):
            exit_after_shutdown(0)

    class Server(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            options: dict[str, Any] = {
                "bind": f"{host}:{port}",
                "workers": settings.server.workers,
                # gthread, answering simple narinfo requests on its event loop
                "worker_class": WORKER_CLASS,
                # SSE log tails hold a thread each (at most server.max_log_streams)
                "threads": SERVER_THREADS,
                "timeout": settings.server.request_timeout,
                "graceful_timeout": 10,
                "accesslog": None,
                "errorlog": "-",
                "loglevel": settings.tracing.level.lower(),
                # one shared control socket path would make instances on a host collide
                "control_socket_disable": True,
                "post_fork": post_fork,
                "worker_exit": worker_exit,
            }
            for key, value in options.items():
                self.cfg.set(key, value)

        def load(self) -> Any:
            return app

    logging.getLogger(__name__).info("circus-server listening on http://%s:%s", host, port)
    try:
        Server().run()
    except SystemExit as stopped:   # the arbiter's halt(): workers are all gone
        if stopped.code not in (0, None):
            raise
    return exit_after_shutdown(0)


if __name__ == "__main__":
    sys.exit(main())
