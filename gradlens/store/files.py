"""The run directory's file primitives that other subsystems build on (search, ``gradlens watch``).

The store keeps its format in private modules (``_io``, ``_lock``, ``_check``); what a sweep or PBT
driver and the watch command need of it is re-exported here, so that no other subpackage imports
a private store module (tests/test_layering.py):

- :func:`atomic_write_bytes` writes a file crash-safe (temporary name, fsync, rename); a killed
  writer leaves at most a file whose name starts with :data:`TMP_PREFIX`.
- :class:`RunLock` is the single-writer lock of a directory (file :data:`LOCK_NAME`), taken over
  with a warning when its owner is dead (:func:`pid_alive`).
- :func:`list_chunks` lists a chunk directory's committed chunks by index.
- :class:`Problems` says how a reader handles damage: warnings, or a StoreError when strict.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> d = Path(tempfile.mkdtemp())
    >>> atomic_write_bytes(d / "state.json", b"{}")
    >>> lock = RunLock(d)
    >>> lock.acquire()
    >>> (d / LOCK_NAME).is_file(), lock.held
    (True, True)
    >>> lock.release()
    >>> sorted(p.name for p in d.iterdir() if p.name.startswith(TMP_PREFIX)), list_chunks(d)
    ([], {})
"""

from __future__ import annotations

from gradlens.store._check import Problems
from gradlens.store._io import TMP_PREFIX, atomic_write_bytes, list_chunks
from gradlens.store._lock import LOCK_NAME, RunLock, pid_alive

__all__ = [
    "LOCK_NAME",
    "TMP_PREFIX",
    "Problems",
    "RunLock",
    "atomic_write_bytes",
    "list_chunks",
    "pid_alive",
]
