"""The processes the bench runs: a dev stack of its own, and `broker <command>` beside it."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from types import FrameType
from typing import Self

from broker.core.config import Settings
from broker.devstack.lifecycle import StartsAndStops
from broker.devstack.stack import start_dev_stack

STARTUP_S = 60.0
# /proc/<pid>/stat after the command name: utime and stime are the 12th and 13th fields.
_UTIME, _STIME = 11, 12


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of `pid` and every live descendant, from /proc (Linux).

    A `broker serve --workers N` supervisor serves nothing itself: its worker
    processes do, so a figure of the broker's CPU must count them too.
    """
    ticks = 0
    for member in process_tree(pid):
        try:
            stat = Path(f"/proc/{member}/stat").read_text()
        except OSError:  # gone meanwhile
            continue
        fields = stat.rsplit(")", 1)[1].split()
        ticks += int(fields[_UTIME]) + int(fields[_STIME])
    return ticks / os.sysconf("SC_CLK_TCK")


def find_process(*needles: str) -> int | None:
    """The first process whose command line holds every one of `needles`, if any."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        line = " ".join(arg.decode(errors="replace") for arg in argv)
        if all(needle in line for needle in needles):
            return int(entry.name)
    return None


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants, through /proc/<pid>/task/<tid>/children."""
    found, pending = [], [pid]
    while pending:
        member = pending.pop()
        found.append(member)
        with suppress(OSError):
            for task in Path(f"/proc/{member}/task").iterdir():
                pending.extend(int(c) for c in (task / "children").read_text().split())
    return found


def progress_logging(log: logging.Logger) -> None:
    """Only the bench's own progress at INFO: pgserver, alembic and HTTP clients are chatty."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    log.setLevel(logging.INFO)


@contextmanager
def own_stack(prefix: str) -> Iterator[tuple[ExitStack, Settings, Path]]:
    """What `make dev` sets up, in a temporary directory named `prefix...`, removed afterwards.

    Yields the exit stack it runs on (for more of the run's services), the stack's
    settings and the directory. Outside pytest's and the dev stack's directories:
    pgserver (as root) opens up the permissions of the parents of its data directory.
    A SIGTERM (`kill`, a CI timeout) stops the run as Ctrl-C does: every process the
    stack started is stopped, rather than left running without its parent.
    """
    work = Path(tempfile.mkdtemp(prefix=prefix))
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        with ExitStack() as stack:
            base = Settings(_env_file=None, env="dev")
            yield stack, start_dev_stack(stack, work / "data", base), work
    finally:
        signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(work, ignore_errors=True)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the cleanup
    raise KeyboardInterrupt


class BrokerCommand(StartsAndStops):
    """`broker <command>` with its output appended to `log_path`; `ready()` says it is up."""

    command: str
    stop_signal = signal.SIGTERM
    stop_wait_s = 30.0

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def ready(self) -> bool:
        """True once the process does what it was started for."""
        raise NotImplementedError

    def start(self) -> Self:
        """Start the process (in the log's directory: no stray .env) and wait until ready."""
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", "from broker.cli import main; main()", self.command],
                cwd=self.log_path.parent,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + STARTUP_S
        while not self.ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"broker {self.command} did not start; see {self.log_path}")
            time.sleep(0.2)
        return self

    def stop(self) -> None:
        """Ask the process to stop; kill it when it has not after `stop_wait_s`."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(self.stop_signal)
            try:
                self.proc.wait(self.stop_wait_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
