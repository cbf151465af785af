"""One run per stage folder: an OS file lock with the holder's name beside it."""

from __future__ import annotations

import os
import socket
import sys
import warnings
from pathlib import Path
from typing import Any

from dataprep.store.atomic import atomic_write_json
from dataprep.store.keys import utcnow
from dataprep.store.records import read_json_record

LOCK_NAME = ".dataprep.lock"  # hidden: readers of the folder skip it
HOLDER_NAME = ".dataprep.lock.json"
_LOCKS: dict[str, Any] = {}  # lock file path -> FileLock, shared by every stage_lock of this process


class StageLocked(Exception):
    """Another process holds the folder's lock (``holder`` says who, when known)."""

    def __init__(self, folder: Path, holder: dict[str, Any] | None):
        self.folder, self.holder = folder, holder
        super().__init__(f"{folder} is in use by another run: {describe_holder(holder)}")


def describe_holder(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "holder unknown (it has only just started)"
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started_at')}: {holder.get('command')}"


class stage_lock:
    """Hold the lock of a stage folder: ``with stage_lock(folder, wait=False): ...``.

    Two runs writing one stage folder at once would both compact it and both
    write a manifest; the second run therefore waits (``wait=True``, at most
    ``timeout`` seconds, None = forever) or raises :class:`StageLocked` at once.
    The lock is an OS file lock (``filelock``), so it is released when the
    holder dies, even by kill -9: a stale lock never blocks a later run. The
    holder's pid, host, start time and command sit in a JSON file beside it
    for the message the second run prints. Re-entrant in one process.
    """

    def __init__(self, folder: Path | str, wait: bool = False, timeout: float | None = None):
        self.folder = Path(folder)
        self.wait, self.timeout = wait, timeout
        self._lock = None

    def __enter__(self) -> "stage_lock":
        from filelock import FileLock, Timeout

        self.folder.mkdir(parents=True, exist_ok=True)
        path = str((self.folder / LOCK_NAME).resolve())
        # one FileLock per path and process: flock() locks of two handles in
        # one process exclude each other, so a nested use would wait on itself
        self._lock = _LOCKS.setdefault(path, FileLock(path, thread_local=False))
        timeout = (-1 if self.timeout is None else self.timeout) if self.wait else 0
        try:
            self._lock.acquire(timeout=timeout)
        except Timeout:
            raise StageLocked(self.folder, self.holder(self.folder)) from None
        if self._lock.lock_counter == 1:
            try:
                atomic_write_json(self.folder / HOLDER_NAME, {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "started_at": utcnow().isoformat(timespec="seconds"),
                    "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else "python",
                })
            except BaseException:  # disk full: do not keep a lock nobody will release
                self._lock.release()
                raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self._lock is None:
            return
        if self._lock.lock_counter == 1:
            try:
                (self.folder / HOLDER_NAME).unlink()
            except OSError:
                pass
        self._lock.release()

    @staticmethod
    def holder(folder: Path | str) -> dict[str, Any] | None:
        """Who holds the lock of ``folder`` (as its holder recorded it), or None."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = read_json_record(Path(folder) / HOLDER_NAME)
        return data if isinstance(data, dict) else None
