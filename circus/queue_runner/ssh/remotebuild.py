"""``nix-store --realise`` on an SSH builder, read by the same parser as local builds.

The builder runs the very command a local worker runs (``nixrun.nix_argv``:
``--log-format internal-json``, ``--timeout``, ``--max-silent-time``,
``max-build-log-size``, ``extra_nix_build_args``), so log lines, failure
reasons and statuses are recognised by the same code. Around it a small
shell script, one channel per step:

1. imports the inputs the runner streams into its stdin (when there are any);
2. keeps stdin open as a *dead man's switch*: when it reaches EOF — Circus
   closed it (cancel, lease lost, shutdown) or the connection died —
   ``nix-store`` gets SIGTERM (it then kills its builders; Nix ``setsid``s
   them, so killing the process group would not), SIGKILL after a grace
   period;
3. after a success, exports the outputs on stdout; the runner imports the
   stream as it arrives (the rest of their closure came from the runner, so
   it is there — when it is not, the caller falls back to asking);
4. reports on stderr, in ``circus:`` lines the parser never sees: the kernel's
   ``oom_kill`` counter before and after the build (an ``oom_killed`` status
   needs it to have moved) and the exit status.
"""

from __future__ import annotations

import shlex
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from paramiko.channel import Channel
from paramiko.ssh_exception import SSHException

from circus.queue_runner.local.nixrun import NixRun, RunOptions, Target, nix_argv
from circus.queue_runner.ssh.connection import Remote
from circus.queue_runner.ssh.transfer import LocalImport, pump

#: seconds between SIGTERM and SIGKILL of a remote nix-store being stopped
KILL_GRACE = 5
#: after asking the builder to stop, the channel is closed if it has not ended by then
CLOSE_AFTER = KILL_GRACE + 5.0
#: exit statuses of the wrapper itself
IMPORT_FAILED = 97
EXPORT_FAILED = 98
MARK = b"circus:"


def build_script(argv: list[str], outputs: list[str], import_inputs: bool) -> str:
    nix = " ".join(shlex.quote(a) for a in argv)
    outs = " ".join(shlex.quote(o) for o in outputs)
    importing = ""
    if import_inputs:
        importing = (f"nix-store --import <&3 >/dev/null || "
                     f"{{ mark import-failed; exit {IMPORT_FAILED}; }}\n")
    return f"""exec 3<&0 0</dev/null
mark() {{ echo "circus:$*" >&2; }}
oom() {{ sed -n 's/^oom_kill //p' /proc/vmstat 2>/dev/null; }}
{importing}mark oom-before $(oom)
{nix} >/dev/null &
pid=$!
{{ read -r line; kill -TERM $pid; sleep {KILL_GRACE}; kill -KILL $pid; }} <&3 >/dev/null 2>&1 &
watcher=$!
wait $pid
rc=$?
kill $watcher 2>/dev/null
mark oom-after $(oom)
mark exit $rc
if [ $rc -eq 0 ]; then
  nix-store --export {outs} || exit {EXPORT_FAILED}
fi
exit $rc
"""


@dataclass
class ScriptReport:
    """What the wrapper said about the run."""

    oom_before: int | None = None
    oom_after: int | None = None
    exit_code: int | None = None
    import_failed: bool = False
    #: output paths imported into the runner's store from the wrapper's stdout
    imported: list[str] = field(default_factory=list)
    import_error: str | None = None

    @property
    def oom_kills(self) -> int | None:
        if self.oom_before is None or self.oom_after is None:
            return None
        return self.oom_after - self.oom_before

    def read(self, line: bytes) -> None:
        tag, _, value = line[len(MARK):].decode(errors="replace").strip().partition(" ")
        if tag == "import-failed":
            self.import_failed = True
            return
        try:
            number = int(value)
        except ValueError:
            return
        if tag == "oom-before":
            self.oom_before = number
        elif tag == "oom-after":
            self.oom_after = number
        elif tag == "exit":
            self.exit_code = number


class ChannelProcess:
    """A channel running :func:`build_script`, shaped like a ``subprocess.Popen``."""

    pid = -1

    def __init__(self, channel: Channel, local_env: Mapping[str, str]) -> None:
        self.channel = channel
        self._stderr = channel.makefile_stderr("rb")
        self.report = ScriptReport()
        #: monotonic time of the last byte from the builder (dead-link watchdog)
        self.last_data = time.monotonic()
        self._outputs = LocalImport(local_env)
        self._pump = pump(channel, self._outputs, self._alive)

    def _alive(self) -> None:
        self.last_data = time.monotonic()

    @property
    def stderr(self) -> Iterator[bytes]:
        """Lines of Nix's stderr (``NixRun._read`` iterates them once)."""
        return self._lines()

    def _lines(self) -> Iterator[bytes]:
        while True:
            try:
                line = self._stderr.readline()
            except (SSHException, OSError, EOFError):
                return
            if not line:
                return
            self.last_data = time.monotonic()
            if line.startswith(MARK):
                self.report.read(line)
                continue
            yield line

    def poll(self) -> int | None:
        return int(self.channel.exit_status) if self.channel.exit_status_ready() else None

    def wait(self) -> int:
        self._pump.join()
        self.report.imported = self._outputs.imported
        self.report.import_error = self._outputs.error
        self.channel.status_event.wait()
        # -1: the channel closed without an exit status (connection lost, or we closed it)
        return int(self.channel.exit_status)


class RemoteNixRun(NixRun):
    """A :class:`NixRun` whose ``nix-store`` runs on an SSH builder."""

    def __init__(self, remote: Remote, targets: list[Target], options: RunOptions,
                 local_env: Mapping[str, str], import_inputs: bool = False) -> None:
        super().__init__(targets, options, None)
        self.remote = remote
        self.local_env = local_env
        self.import_inputs = import_inputs
        self.channel: Channel | None = None
        self._closer: threading.Timer | None = None

    def _spawn(self, drvs: list[str]) -> ChannelProcess:
        outputs = sorted({p for t in self.targets.values() for p in t.outputs.values()})
        script = build_script(nix_argv(drvs, self.options), outputs, self.import_inputs)
        self.channel = self.remote.open(script)
        return ChannelProcess(self.channel, self.local_env)

    @property
    def report(self) -> ScriptReport:
        process = self.process
        return process.report if isinstance(process, ChannelProcess) else ScriptReport()

    @property
    def last_data(self) -> float:
        process = self.process
        return process.last_data if isinstance(process, ChannelProcess) else time.monotonic()

    def touch(self) -> None:
        """The builder just showed it is alive (it took our input stream)."""
        if isinstance(self.process, ChannelProcess):
            self.process.last_data = time.monotonic()

    def kill(self) -> None:
        """Stop the remote build: EOF on its stdin, then close the channel if need be."""
        self.killed = True
        channel = self.channel
        if channel is None or channel.closed:
            return
        try:
            channel.shutdown_write()
        except (SSHException, OSError, EOFError):
            channel.close()
            return
        if self._closer is None:
            self._closer = threading.Timer(CLOSE_AFTER, channel.close)
            self._closer.daemon = True
            self._closer.start()

    def abandon(self) -> None:
        """Close the channel now (the connection looks dead)."""
        self.killed = True
        if self.channel is not None:
            self.channel.close()

    def kill_derivation(self, drv_path: str) -> int:
        # one derivation per remote run: stopping it is stopping the run
        if drv_path in self.targets:
            self.kill()
            return 1
        return 0

    def finish(self) -> None:
        if self._closer is not None:
            self._closer.cancel()
        if self.channel is not None:
            self.channel.close()
