"""The writer lock of a run directory: one live writer per run, stale locks taken over.

The lock is the file ``<run>/.lock`` holding JSON ``{"pid", "host", "started"}``. It is created
atomically (written under a private name, then hard-linked to ``.lock``, which fails if it exists,
so no reader ever sees a half-written lock) and, on POSIX, kept under an exclusive ``flock`` for the
writer's lifetime; the kernel drops that ``flock`` when the process dies, however it dies.

A writer that finds ``.lock`` already there decides:

- someone holds its ``flock``, or its pid is alive on this host: refuse (:class:`StoreError` naming
  the path, the pid and the host);
- its pid is dead on this host: take it over (rewrite it under our ``flock``) with a
  :class:`GradlensWarning`; two writers racing for the same stale lock cannot both win, because only
  one can hold the ``flock``;
- it was written on another host: refuse, since liveness cannot be checked from here.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import socket
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

from gradlens._errors import GradlensWarning, StoreError

try:  # POSIX only; elsewhere the pid check alone decides.
    import fcntl as _fcntl
except ImportError:  # pragma: no cover - Windows
    _fcntl = None  # type: ignore[assignment]  # the module is absent here; None marks it

__all__: list[str] = []

LOCK_NAME = ".lock"
_MAX_TRIES = 20


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs on this host and is not a zombie (True when unsure)."""
    if pid <= 0:
        return False
    if os.name != "posix":  # pragma: no cover - os.kill(pid, 0) would terminate on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    try:  # a killed child not yet reaped by its parent is a zombie: dead for our purpose
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _try_flock(fd: int) -> bool:
    if _fcntl is None:  # pragma: no cover - Windows
        return True
    try:
        _fcntl.flock(fd, _fcntl.LOCK_EX | _fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _owner_record() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _read_record(fd: int) -> dict[str, Any] | None:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = b""
    while chunk := os.read(fd, 4096):
        raw += chunk
    try:
        rec = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(rec, dict) or not isinstance(rec.get("pid"), int):
        return None
    return rec


def _write_record(fd: int, rec: dict[str, Any]) -> None:
    data = json.dumps(rec).encode("utf-8")
    os.lseek(fd, 0, os.SEEK_SET)
    os.ftruncate(fd, 0)
    os.write(fd, data)
    os.fsync(fd)


class RunLock:
    """Exclusive writer lock on one run directory (see the module docstring for the rules)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object currently holds the lock."""
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock, taking over a stale one with a warning; raise StoreError if it is live."""
        if self._fd is not None:
            return
        for attempt in range(_MAX_TRIES):
            fd = self._try_create()
            if fd is None:
                fd = self._try_take_over(last=attempt == _MAX_TRIES - 1)
            if fd is not None:
                self._fd = fd
                return
        raise StoreError(  # pragma: no cover - needs a pathological race
            f"Could not take the writer lock {self.path} after {_MAX_TRIES} tries: other "
            f"processes keep creating and removing it."
        )

    def release(self) -> None:
        """Remove the lock file and drop the ``flock``; idempotent."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            with contextlib.suppress(FileNotFoundError):
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    os.unlink(self.path)
        finally:
            os.close(fd)

    def _try_create(self) -> int | None:
        """Create a fresh lock atomically; None if one already exists."""
        tmp = self.path.with_name(f"{LOCK_NAME}.{os.getpid()}.{uuid.uuid4().hex}")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            _try_flock(fd)  # a fresh private file: nobody else can hold it
            _write_record(fd, _owner_record())
            os.link(tmp, self.path)  # atomic, fails if the lock exists
        except FileExistsError:
            os.close(fd)
            return None
        except OSError:  # a file system without hard links: plain O_EXCL creation
            os.close(fd)
            return self._create_excl()
        except BaseException:
            os.close(fd)
            raise
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return fd

    def _create_excl(self) -> int | None:
        """Create the lock in place with O_EXCL (the record is briefly empty; readers wait)."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return None
        try:
            _try_flock(fd)
            _write_record(fd, _owner_record())
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _try_take_over(self, last: bool) -> int | None:
        """Inspect an existing lock: refuse a live one, take over a stale one, None to retry."""
        try:
            fd = os.open(self.path, os.O_RDWR)
        except FileNotFoundError:
            return None  # released meanwhile: retry creating it
        try:
            locked = _try_flock(fd)
            rec = _read_record(fd)
            try:
                same_inode = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same_inode = False
            if not same_inode:
                os.close(fd)
                return None  # the file we opened was released and replaced: retry
            if not locked:
                self._refuse(rec, "it holds the lock")
            if rec is None and not last:  # maybe being created in place: look again shortly
                os.close(fd)
                time.sleep(0.02)
                return None
            if rec is None:
                raise StoreError(
                    f"The writer lock {self.path} is unreadable (not the JSON record gradlens "
                    f"writes). If no process is writing this run, delete the file and retry."
                )
            host = socket.gethostname()
            if rec.get("host") != host:
                self._refuse(rec, f"it was written on another host, unverifiable from {host}")
            if pid_alive(int(rec["pid"])):
                self._refuse(rec, "that process is alive")
            warnings.warn(
                f"Taking over the stale writer lock {self.path}: its owner, pid {rec['pid']} on "
                f"{rec.get('host')} (started {rec.get('started')}), is no longer running. Chunks "
                f"it flushed are kept; what it had not flushed is lost.",
                GradlensWarning,
                stacklevel=5,
            )
            _write_record(fd, _owner_record())
            return fd
        except BaseException:
            os.close(fd)
            raise

    def _refuse(self, rec: dict[str, Any] | None, why: str) -> None:
        if rec is None:
            owner = "another process (its record is not written yet)"
        else:
            owner = f"pid {rec['pid']} on {rec.get('host')} (started {rec.get('started')})"
        raise StoreError(
            f"The run directory {self.path.parent} is being written by {owner}; {why}. "
            f"A run has one writer at a time: write to another directory, or close the other "
            f"writer first. If that process is gone, delete {self.path}."
        )
