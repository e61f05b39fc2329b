"""One process per run directory: an advisory lock on ``RUN/.lock``.

The lock is ``fcntl.flock`` on an open file, so the kernel drops it when the process ends,
however it ends (SIGKILL, power loss): a lock is never stale and the file is never removed
(removing it while another process waits on it would let two processes hold "the" lock).
The file holds the pid of the last holder, for the message that refuses a second process.
flock exists on POSIX only; elsewhere runs are not locked.
"""

from __future__ import annotations

import contextlib
import errno
import os
import weakref
from pathlib import Path

from flowkit.errors import FlowkitError

try:
    import fcntl
except ImportError:  # Windows: no flock
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".lock"


class RunInUseError(FlowkitError):
    """Another live process holds the run directory's lock."""


class RunLock:
    """The lock of one run directory, held from `acquire` until `release` (or the process ends)."""

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / LOCK_NAME
        self._fd: int | None = None
        self._finalizer: weakref.finalize | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, what: str = "use", *, wait: bool = False) -> RunLock:
        """Takes the lock at once or raises `RunInUseError` naming the holder's pid; ``what``
        the refused process wanted to do, for the message. ``wait``: blocks until the holder
        releases it instead (the jobs of one level-jobs directory take turns assembling it)."""
        if self._fd is not None or fcntl is None:
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:  # held by another open file, in this process or another
            holder = _read_pid(fd)
            os.close(fd)
            by = f"process {holder}" if holder else "another process"
            raise RunInUseError(
                f"{self.path.parent} is in use by {by} (it holds {self.path}); refusing to {what} it while "
                "that process runs. Wait for it to finish, or stop it first (Ctrl-C writes a checkpoint)."
            ) from None
        except OSError as exc:  # the file system cannot lock: ENOLCK on an NFS mount without a lock daemon, ...
            os.close(fd)
            raise FlowkitError(
                f"cannot lock {self.path} to {what} {self.path.parent}: {exc.strerror or exc} "
                f"({errno.errorcode.get(exc.errno, exc.errno)}). The file system of {self.path.parent} does not "
                "support flock here; use a local folder, or an NFS or Lustre mount with locking on "
                "(docs/scale-out.md)."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        # Released when this object is collected, too, so a forgotten lock never outlives its owner.
        self._finalizer = weakref.finalize(self, _unlock, fd)
        return self

    def release(self) -> None:
        if self._finalizer is not None:
            self._finalizer()
        self._fd, self._finalizer = None, None


def _unlock(fd: int) -> None:
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_UN)
    with contextlib.suppress(OSError):
        os.close(fd)


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip())
    except (OSError, ValueError):
        return None
