"""Advisory locks on directories: one ``rkd sweep`` per sweep directory, one process per run of a sweep.

A lock is an ``flock`` on a file inside the directory, held for as long as its holder lives (the
operating system releases it when the process exits, however it exits, so a killed holder never leaves
a stale lock). The file records who holds it (host, process id, start time, command), so a refused
process can name the holder.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from rkd_engine.training.runs import RunDirError


class LockedError(RunDirError):
    """The directory is locked by another process; the message names the holder."""


def _holder_text(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if not isinstance(info, dict) or "pid" not in info:
        return "another process"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("since", 0)))
    what = f" ({info['command']})" if info.get("command") else ""
    return f"process {info['pid']} on host {info.get('host', '?')} since {since}{what}"


class DirLock:
    """An exclusive lock on ``directory`` through the file ``directory/name``.

    ``acquire(wait=s)`` retries for up to ``s`` seconds, then raises ``LockedError`` naming the holder
    and ``what`` is locked. Use as a context manager or call ``release``.
    """

    def __init__(self, directory: str | Path, name: str, *, what: str, command: str = "") -> None:
        self.path = Path(directory) / name
        self.what = what
        self.command = command
        self._fd: int | None = None

    def acquire(self, *, wait: float = 0.0) -> DirLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise LockedError(
                        f"{self.what} is in use by {_holder_text(self.path)} (lock {self.path}); wait for it to "
                        "finish or stop it"
                    ) from None
                time.sleep(0.2)
        info: dict[str, Any] = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.time(),
            "command": self.command or " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv)),
        }
        data = json.dumps(info).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
            except OSError:
                pass
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self) -> DirLock:
        return self if self._fd is not None else self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
