"""How a daemon leaves once its own shutdown is complete.

After ``QueueRunner.shutdown`` has stopped its threads and handed every step back,
the interpreter's own teardown (clearing modules, garbage-collecting some 150,000
objects: SQLAlchemy, Celery, kombu, paramiko) took another 1.5-4 s on the loaded
2-core test machine, from ``main`` returning to the process being gone; whoever
waits for the process (``circus up`` restarting it, systemd stopping it, a test)
waited for nothing. :func:`exit_after_shutdown` leaves that teardown out.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading


def exit_after_shutdown(code: int) -> int:
    """Exit with ``code`` now, without tearing the heap down; the ``atexit`` handlers
    still run (``logging.shutdown`` flushes the log handlers, temporary directories are
    removed, paramiko's threads are joined) and stdio is flushed.

    While a non-daemon thread still runs (the interpreter would wait for it), returns
    ``code`` instead, for the usual exit. Only for the end of a complete shutdown."""
    main = threading.main_thread()
    if any(t is not main and not t.daemon and t.is_alive() for t in threading.enumerate()):
        return code
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):   # closed or gone: nothing left to lose
            pass
    os._exit(code)
