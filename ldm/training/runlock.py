"""One writer per log folder, and a log folder that can be written.

`RunLock(logdir)` creates `<logdir>/run.lock` atomically (O_EXCL) holding the pid, host and
start time of the process training into that folder. A second writer (two `-n x` started in
the same second, two `-r` of one folder) is refused with a message naming the holder. A lock
whose process is gone (a run killed with -9 or by the OOM killer, same host) is taken over with
a message; a lock from another host is never taken over automatically (delete it by hand once
that run is surely gone). Only the launching process (rank 0 of node 0) takes the lock; DDP
workers write nothing but what rank 0 tells them to.

`check_writable(folder)` writes and deletes a probe file first, so a read-only or full disk is
reported before the model is built, not as a Lightning error after the first step.
"""
from __future__ import annotations

import datetime
import errno
import json
import os
import socket
import sys
from typing import Any, Optional

from pytorch_lightning.utilities import rank_zero_info

LOCK_NAME = "run.lock"


class RunLockedError(RuntimeError):
    """Another live process is writing this log folder."""


class LogFolderError(OSError):
    """The log folder cannot be written (read-only, full, no permission)."""


def launcher_process() -> bool:
    """True in the process that owns the run (not a DDP / torchrun / SLURM worker of rank > 0)."""
    for var in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"):
        if os.environ.get(var, "0") not in ("", "0"):
            return False
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


class RunLock:
    """`<logdir>/run.lock`, held for the lifetime of a training process (a context manager)."""

    _held: set[str] = set()  # lock paths held by this process (main.main may run several times in one)

    def __init__(self, logdir: str):
        self.path = os.path.join(logdir, LOCK_NAME)
        self.acquired = False

    def describe(self, info: dict[str, Any]) -> str:
        return (f"pid {info.get('pid')} on {info.get('host')} since {info.get('start')}"
                + (f" ({info.get('argv')})" if info.get("argv") else ""))

    def _read(self) -> Optional[dict[str, Any]]:
        try:
            with open(self.path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def acquire(self) -> "RunLock":
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "start": datetime.datetime.now().isoformat(timespec="seconds"),
                "argv": " ".join(sys.argv[:6])}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read()
                if holder is None:  # half-written by a writer killed between create and write, or unreadable
                    holder = {"pid": None, "host": socket.gethostname(), "start": "?"}
                if not self._stale(holder):
                    raise RunLockedError(
                        f"log folder {os.path.dirname(self.path)} is being written by another run "
                        f"({self.describe(holder)}); wait for it to finish, or use another -n/--name. "
                        f"If that run is gone, delete {self.path}.") from None
                rank_zero_info(f"taking over the stale lock {self.path} of a run that is no longer running "
                               f"({self.describe(holder)})")
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(info, f)
            self.acquired = True
            RunLock._held.add(self.path)
            return self
        raise RunLockedError(f"could not take the lock {self.path} (another process keeps creating it)")

    def ensure_free(self) -> None:
        """Raise RunLockedError if a live run holds this lock (checked before anything else of `-r`)."""
        holder = self._read()
        if holder is not None and os.path.exists(self.path) and not self._stale(holder):
            raise RunLockedError(f"log folder {os.path.dirname(self.path)} is being written by another run "
                                 f"({self.describe(holder)}); wait for it to finish. If that run is gone, "
                                 f"delete {self.path}.")

    def _stale(self, holder: dict[str, Any]) -> bool:
        if holder.get("host") != socket.gethostname():
            return False  # cannot see that process: never steal another machine's lock
        pid = holder.get("pid")
        if not isinstance(pid, int):
            return True
        if pid == os.getpid():
            return self.path not in RunLock._held  # left behind by an earlier run of this process
        return not _alive(pid)

    def release(self) -> None:
        if not self.acquired:
            return
        self.acquired = False
        RunLock._held.discard(self.path)
        holder = self._read()
        if holder is not None and holder.get("pid") == os.getpid():
            try:
                os.unlink(self.path)
            except OSError:
                pass

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def check_writable(folder: str) -> None:
    """Raise OSError naming `folder` if a file cannot be created, written and synced there."""
    probe = os.path.join(folder, f".write-test-{os.getpid()}")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"\0" * 65536)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        what = {errno.EROFS: "is on a read-only file system", errno.ENOSPC: "has no space left",
                errno.EACCES: "is not writable by this user", errno.EDQUOT: "is over its disk quota"}
        raise LogFolderError(e.errno, f"log folder {folder} {what.get(e.errno, 'cannot be written')} "
                               f"({e.strerror}); choose another with -l/--logdir") from e
    finally:
        if os.path.exists(probe):
            try:
                os.unlink(probe)
            except OSError:
                pass
