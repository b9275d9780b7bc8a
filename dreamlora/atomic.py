"""Safe writes: atomic files, write failures as one clear error, file modes, and run locks.

- `atomic_path`: write beside the target under a temporary name, then rename over it, so no reader
  ever sees a partial file.
- `write_error`: a failed write (disk full, file-size limit, read-only or forbidden folder) as one
  sentence naming the file and what to do. safetensors reports these as its own `SafetensorError`
  ("... (os error 28)"), not as OSError; `as_os_error` recovers the OSError from it.
- `new_file_mode`: temporary files are created 0600 (tempfile); outputs get the mode an ordinary tool
  gives a new file (0666 less the umask), so a shared models folder or prior cache can read them.
- `RunLock`: an exclusive `flock` on a lock file, released by the OS when its process dies, so two
  runs never write the same output or run folder at once.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import re
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import DreamLoraError

# Errors of the disk or its permissions, not of the program: each has advice a user can follow.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)
WRITE_ERRNOS = (*DISK_FULL, errno.EFBIG, *NOT_WRITABLE)

_OS_ERROR_CODE = re.compile(r"os error (\d+)")


def as_os_error(exc: BaseException, filename: str | os.PathLike | None = None) -> OSError | None:
    """The OSError behind `exc`: itself, or the one a safetensors error reports ("... (os error 27)").

    Returns:
        None when `exc` is not a failure of the operating system (a bug, a bad tensor).
    """
    if isinstance(exc, OSError):
        return exc
    if type(exc).__name__ == "SafetensorError":  # safetensors' Rust I/O errors carry the errno only in the text
        match = _OS_ERROR_CODE.search(str(exc))
        if match:
            code = int(match.group(1))
            return OSError(code, os.strerror(code), None if filename is None else str(filename))
    return None


def write_error(target: str | os.PathLike, error: OSError, advice: str = "") -> str:
    """One sentence for a failed write of `target`: what happened and what to do.

    Args:
        target: the file or folder being written.
        error: the failure (see `as_os_error`).
        advice: what to do when the folder is not writable (default: choose a writable folder).
    """
    reason = error.strerror or str(error)
    if error.errno in DISK_FULL:
        return f"disk full while writing '{target}' ({reason}). Free some space and run again."
    if error.errno == errno.EFBIG:
        return (f"cannot write '{target}': {reason}: it would pass the file-size limit (`ulimit -f`, or the "
                "largest file the file system holds). Raise the limit or write to another disk.")
    if error.errno in NOT_WRITABLE:
        return f"cannot write '{target}': {reason}. {advice or 'Choose a folder you can write to.'}"
    return f"cannot write '{target}': {reason}. {advice}".rstrip()


def check_writable(target: str | os.PathLike, flag: str) -> None:
    """Refuse, before any work, a file that could not be written at the end: its folder (or the nearest one
    that exists) must be a writable folder on a writable file system. Nothing is created.

    Raises:
        DreamLoraError: naming `flag` and the folder.
    """
    target = Path(target)
    if target.is_dir():
        raise DreamLoraError(f"{flag} '{target}' is a folder; give a file name inside it.")
    folder = target.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise DreamLoraError(f"cannot write '{target}': '{folder}' is a file, not a folder. Choose another {flag}.")
    if not os.access(folder, os.W_OK | os.X_OK):  # also false on a read-only mount, for root too
        read_only = hasattr(os, "statvfs") and bool(os.statvfs(folder).f_flag & getattr(os, "ST_RDONLY", 1))
        error = OSError(errno.EROFS if read_only else errno.EACCES,
                        os.strerror(errno.EROFS if read_only else errno.EACCES))
        raise DreamLoraError(write_error(target, error, f"Choose another {flag}."))


def _umask() -> int:
    """The process's umask, read without changing it where Linux reports it (os.umask can only set it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and put back (a thread creating a file meanwhile gets 022)
    os.umask(mask)
    return mask


def new_file_mode(folder: bool = False) -> int:
    """The mode `open()` or `mkdir()` would give a new file or folder: 0666 (0777) less the umask."""
    return (0o777 if folder else 0o666) & ~_umask()


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success rename it to `target`.

    A crash or exception leaves the target untouched and removes the temporary file, so no
    reader ever sees a partial file. The file gets the mode of a newly created file (umask).

    Raises:
        DreamLoraError: the write failed for a reason of the disk (full, file-size limit, read-only,
            forbidden), naming `target`.
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise DreamLoraError(write_error(target, exc)) from exc
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes 0600, and safetensors' writer creates its files 0600 too: other users of a shared models
        # folder or prior cache could not read them. Set the mode after the writer is done.
        os.chmod(tmp_path, new_file_mode())
        os.replace(tmp_path, target)
    except BaseException as exc:
        tmp_path.unlink(missing_ok=True)
        cause = as_os_error(exc, tmp_path) if isinstance(exc, Exception) else None
        if cause is not None and cause.errno in WRITE_ERRNOS:
            raise DreamLoraError(write_error(target, cause)) from cause
        raise


def write_bytes_atomic(target: str | os.PathLike, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(target: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(target, text.encode("utf-8"))


# ----------------------------------------------------------------------------------------------
# Locks


class LockedError(DreamLoraError):
    """Another live process holds the lock (its PID and host are in the message)."""


class RunLock:
    """An exclusive lock on `path` (a small file that records who holds it) until `release()` or death.

    `flock` locks belong to the open file, so the OS drops the lock when the holder exits in any way,
    SIGKILL included: a lock file left behind by a dead run never blocks the next one. Where the file
    system cannot lock (some network mounts), `acquire` returns None and the run goes on unlocked.
    """

    def __init__(self, path: Path, fd: int):
        self.path, self._fd = path, fd

    @classmethod
    def acquire(cls, path: str | os.PathLike, what: str, advice: str) -> RunLock | None:
        """Take the lock or raise naming its holder.

        Args:
            path: the lock file (created if missing).
            what: what the lock protects, for the message ("output 'dog.safetensors'").
            advice: what to do instead of waiting.

        Raises:
            LockedError: another process holds it.
            DreamLoraError: the lock file cannot be created (read-only folder, ...).
        """
        try:
            import fcntl
        except ImportError:  # not POSIX: no flock
            return None
        path = Path(path)
        while True:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            except FileNotFoundError:
                continue  # a run that gave up removed its empty folder between our mkdir and open
            except OSError as exc:
                raise DreamLoraError(write_error(path, exc)) from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _describe_holder(os.pread(fd, 4096, 0))
                os.close(fd)
                raise LockedError(f"{what} is in use by another dreamlora run ({holder}). Wait for it to "
                                  f"finish, or {advice}.") from None
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    return None
                raise DreamLoraError(write_error(path, exc)) from exc
            # The holder we waited on may have removed the file between our open and our lock: then we
            # hold a lock on a name nobody else sees. Lock again until the file we locked is the one there.
            try:
                here, ours = os.stat(path), os.fstat(fd)
                if (here.st_dev, here.st_ino) == (ours.st_dev, ours.st_ino):
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "since": datetime.datetime.now().astimezone().replace(microsecond=0).isoformat(),
                  "command": " ".join(["dreamlora", *sys.argv[1:]])[:300]}
        with contextlib.suppress(OSError):  # a full disk: the lock holds all the same; others read "just started"
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        return cls(path, fd)

    def release(self) -> None:
        """Remove the lock file and drop the lock (removed first, while still held, so no one locks a stale name)."""
        if self._fd < 0:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self._fd)
        self._fd = -1


def _describe_holder(data: bytes) -> str:
    """'PID 1234 on host gpu7 since 2026-01-01T10:00:00+01:00' from a lock file's record."""
    try:
        record = json.loads(data.decode("utf-8"))
        return f"PID {int(record['pid'])} on host {record['host']} since {record['since']}"
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return "it has just started"  # the holder locked the file and is writing its record
