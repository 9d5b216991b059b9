"""Where trials run: a local process pool (the default) or a Ray cluster, behind one interface.

An :class:`Executor` does two things, and sweeps and PBT use nothing else:

- ``submit(fn, *args)`` runs a picklable module-level function somewhere and returns a
  :class:`concurrent.futures.Future` (sweeps: one training per call);
- ``host(cls, *args)`` builds an object somewhere that keeps its state between calls and returns a
  :class:`Host` whose ``call(method, *args)`` returns a future (PBT: a few live trainers per
  host). Calls to one host run one at a time, in order; different hosts run in parallel.

:class:`LocalExecutor` uses ``concurrent.futures.ProcessPoolExecutor`` (``spawn`` context) for
``submit`` and one ``spawn``-ed process per host; with ``workers=1`` everything runs in this
process. Worker processes die with the process that started them (Linux), so killing a sweep
never leaves trainers running behind it. :class:`RayExecutor` maps ``submit`` to Ray tasks and
``host`` to Ray actors of one CPU each.

Example:
    >>> import operator
    >>> with LocalExecutor(workers=1) as ex:
    ...     ex.submit(operator.add, 2, 3).result()
    5
    >>> with LocalExecutor(workers=1) as ex:
    ...     sorted(r.result() for _, r in ex.map_unordered(abs, [(-1,), (2,), (-3,)]))
    [1, 2, 3]
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import multiprocessing as mp
import os
import pickle
import signal
import sys
import threading
import traceback
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from gradlens._errors import GradlensError, require
from gradlens._validate import check_int

__all__ = ["Executor", "Host", "LocalExecutor", "RayExecutor", "make_executor"]


def _default_workers() -> int:
    return max(1, min(os.cpu_count() or 1, 2))


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (best effort elsewhere)."""
    if not sys.platform.startswith("linux"):  # pragma: no cover
        return
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)


def _init_worker(threads: int) -> None:
    """Initializer of local worker processes: die with the driver, share the CPUs fairly."""
    _die_with_parent()
    import torch

    torch.set_num_threads(threads)


def _portable(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling, else a RuntimeError carrying its type, text and trace."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        return RuntimeError(f"{type(exc).__name__}: {exc}\n{text}")
    return exc


class Host(ABC):
    """A stateful object living on a worker; ``call`` runs one of its methods there.

    Example:
        >>> with LocalExecutor(workers=1) as ex:
        ...     h = ex.host(list, [3, 1])
        ...     h.call("append", 2).result(), h.call("__len__").result()
        (None, 3)
    """

    @abstractmethod
    def call(self, method: str, *args: Any) -> cf.Future:
        """Run ``method(*args)`` on the hosted object; calls run in submission order."""

    def close(self) -> None:
        """Release the host (its process or actor)."""


class Executor(ABC):
    """The interface sweeps and PBT run on; see the module docstring.

    Attributes:
        workers: How many trials or hosts run in parallel.
    """

    workers: int

    @abstractmethod
    def submit(self, fn: Callable[..., Any], *args: Any) -> cf.Future:
        """Run ``fn(*args)`` (a picklable module-level function) and return its future."""

    @abstractmethod
    def host(self, cls: Callable[..., Any], *args: Any) -> Host:
        """Build ``cls(*args)`` on a worker and return a handle to call its methods."""

    def map_unordered(
        self,
        fn: Callable[..., Any],
        items: Iterable[tuple[Any, ...]],
        *,
        on_submit: Callable[[int], None] | None = None,
    ) -> Iterator[tuple[int, cf.Future]]:
        """Run ``fn(*item)`` for every item, at most :attr:`workers` at a time.

        Yields ``(index, future)`` as each finishes (the future holds the result or the
        exception); ``on_submit(index)`` is called just before an item is handed out.

        Example:
            >>> with LocalExecutor(workers=1) as ex:
            ...     [(i, f.result()) for i, f in ex.map_unordered(pow, [(2, 3), (3, 2)])]
            [(0, 8), (1, 9)]
        """
        queue = deque(enumerate(items))
        running: dict[cf.Future, int] = {}
        while queue or running:
            while queue and len(running) < self.workers:
                i, args = queue.popleft()
                if on_submit is not None:
                    on_submit(i)
                running[self.submit(fn, *args)] = i
            done, _ = cf.wait(list(running), return_when=cf.FIRST_COMPLETED)
            for fut in sorted(done, key=running.__getitem__):
                yield running.pop(fut), fut

    def close(self) -> None:
        """Release workers (idempotent)."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# Local
# --------------------------------------------------------------------------------------------


def _done_future(fn: Callable[..., Any], *args: Any) -> cf.Future:
    fut: cf.Future = cf.Future()
    try:
        fut.set_result(fn(*args))
    except Exception as exc:
        fut.set_exception(exc)
    return fut


class _InlineHost(Host):
    def __init__(self, cls: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self._obj = cls(*args)

    def call(self, method: str, *args: Any) -> cf.Future:
        return _done_future(getattr(self._obj, method), *args)


def _host_main(conn: Any, cls: Callable[..., Any], args: tuple[Any, ...], threads: int) -> None:
    """Body of a local host process: build the object, then serve calls until EOF or None."""
    _init_worker(threads)
    try:
        obj = cls(*args)
    except BaseException as exc:
        conn.send((False, _portable(exc)))
        return
    conn.send((True, None))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        method, call_args = msg
        try:
            reply = (True, getattr(obj, method)(*call_args))
        except BaseException as exc:
            reply = (False, _portable(exc))
        try:
            conn.send(reply)
        except (BrokenPipeError, OSError):
            return


class _ProcessHost(Host):
    """A host in its own spawned process, talked to over a pipe; a thread resolves the futures."""

    def __init__(self, cls: Callable[..., Any], args: tuple[Any, ...], threads: int) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_host_main, args=(child, cls, args, threads), daemon=True)
        self._proc.start()
        child.close()
        self._lock = threading.Lock()
        self._pending: deque[cf.Future] = deque()
        self.ready: cf.Future = cf.Future()
        self._pending.append(self.ready)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                ok, value = self._conn.recv()
            except (EOFError, OSError):
                break
            with self._lock:
                fut = self._pending.popleft()
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)
        with self._lock:
            pending, self._pending = list(self._pending), deque()
        self._proc.join(timeout=10)
        code = self._proc.exitcode
        for fut in pending:
            fut.set_exception(
                RuntimeError(f"The worker process {self._proc.pid} ended (exit code {code}).")
            )

    def call(self, method: str, *args: Any) -> cf.Future:
        fut: cf.Future = cf.Future()
        with self._lock:
            self._pending.append(fut)
            try:
                self._conn.send((method, args))
            except (BrokenPipeError, OSError) as exc:
                self._pending.pop()
                fut.set_exception(RuntimeError(f"The worker process is gone ({exc})."))
        return fut

    def close(self) -> None:
        with contextlib.suppress(BrokenPipeError, OSError):
            self._conn.send(None)
        self._proc.join(timeout=10)
        if self._proc.is_alive():  # pragma: no cover - a hung worker
            self._proc.kill()
            self._proc.join()
        self._reader.join(timeout=10)
        self._conn.close()


class LocalExecutor(Executor):
    """Trials on a local process pool (``spawn`` context); ``workers=1`` runs them in-process.

    Args:
        workers: Parallel processes; ``None``: ``min(cpus, 2)``. Each worker process gets
            ``cpus // workers`` torch threads.

    Example:
        >>> LocalExecutor(workers=1).workers
        1
    """

    def __init__(self, workers: int | None = None) -> None:
        self.workers = check_int("workers", workers, minimum=1, none_ok=True) or _default_workers()
        self._threads = max(1, (os.cpu_count() or 1) // self.workers)
        self._pool: cf.ProcessPoolExecutor | None = None
        self._hosts: list[Host] = []

    def submit(self, fn: Callable[..., Any], *args: Any) -> cf.Future:
        if self.workers == 1:
            return _done_future(fn, *args)
        if self._pool is None:
            self._pool = cf.ProcessPoolExecutor(
                self.workers,
                mp_context=mp.get_context("spawn"),
                initializer=_init_worker,
                initargs=(self._threads,),
            )
        return self._pool.submit(fn, *args)

    def host(self, cls: Callable[..., Any], *args: Any) -> Host:
        h: Host = (
            _InlineHost(cls, args) if self.workers == 1 else _ProcessHost(cls, args, self._threads)
        )
        self._hosts.append(h)
        return h

    def close(self) -> None:
        hosts, self._hosts = self._hosts, []
        for h in hosts:
            h.close()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __repr__(self) -> str:
        return f"LocalExecutor(workers={self.workers})"


# --------------------------------------------------------------------------------------------
# Ray
# --------------------------------------------------------------------------------------------


def _call(fn: Callable[..., Any], *args: Any) -> Any:
    """The one Ray remote function: calls ``fn`` (Ray only wraps Python functions, not builtins)."""
    return fn(*args)


class _RayHostActor:
    """The object a Ray actor holds: builds ``cls(*args)`` and forwards method calls to it."""

    def __init__(self, cls: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self._obj = cls(*args)

    def call(self, method: str, args: tuple[Any, ...]) -> Any:
        return getattr(self._obj, method)(*args)


class _RayHost(Host):
    def __init__(self, ray: Any, actor_cls: Any, cls: Callable[..., Any], args: tuple) -> None:
        self._ray = ray
        self._actor = actor_cls.remote(cls, args)

    def call(self, method: str, *args: Any) -> cf.Future:
        return self._actor.call.remote(method, args).future()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._ray.kill(self._actor)


class RayExecutor(Executor):
    """Trials as Ray tasks and hosts as Ray actors (one CPU each), on a cluster or locally.

    Args:
        address: A Ray cluster address (``"auto"``, ``"ray://head:10001"``); ``None`` starts a
            local Ray instance with ``workers`` CPUs (shut down again by :meth:`close`). When
            Ray is already initialised in this process, that instance is used as is.
        workers: Trials in flight at once; ``None``: the cluster's CPU count.

    Every node needs gradlens installed (or a Ray ``runtime_env`` providing it) and must see
    the storage directory at the same path (a shared filesystem).

    Example:
        >>> ex = RayExecutor(workers=1)  # doctest: +SKIP
        >>> ex.submit(abs, -2).result()  # doctest: +SKIP
        2
    """

    def __init__(self, address: str | None = None, workers: int | None = None) -> None:
        ray: Any = require("ray", "ray", "RayExecutor")  # the module, untyped
        self._ray = ray
        check_int("workers", workers, minimum=1, none_ok=True)
        self._owns = False
        if not self._ray.is_initialized():
            kwargs: dict[str, Any] = {
                "address": address,
                "include_dashboard": False,
                "logging_level": "ERROR",
            }
            if address is None:
                kwargs["num_cpus"] = workers or _default_workers()
            self._ray.init(**kwargs)
            self._owns = True
        cpus = int(self._ray.cluster_resources().get("CPU", 1))
        self.workers = workers or max(1, cpus)
        self._runner = self._ray.remote(num_cpus=1)(_call)
        self._actor_cls = self._ray.remote(num_cpus=1)(_RayHostActor)
        self._hosts: list[Host] = []

    def submit(self, fn: Callable[..., Any], *args: Any) -> cf.Future:
        return self._runner.remote(fn, *args).future()

    def host(self, cls: Callable[..., Any], *args: Any) -> Host:
        h = _RayHost(self._ray, self._actor_cls, cls, args)
        self._hosts.append(h)
        return h

    def close(self) -> None:
        hosts, self._hosts = self._hosts, []
        for h in hosts:
            h.close()
        if self._owns and self._ray.is_initialized():
            self._ray.shutdown()
            self._owns = False

    def __repr__(self) -> str:
        return f"RayExecutor(workers={self.workers})"


def make_executor(
    kind: str = "local", *, workers: int | None = None, address: str | None = None
) -> Executor:
    """Build the executor an ``[executor]`` table asks for.

    Args:
        kind: ``"local"`` or ``"ray"``.
        workers: Parallel trials (see :class:`LocalExecutor`, :class:`RayExecutor`).
        address: Ray cluster address (Ray only).

    Example:
        >>> make_executor("local", workers=1)
        LocalExecutor(workers=1)
    """
    if kind == "local":
        if address is not None:
            raise GradlensError(f"`address` is only for the Ray executor; found {address!r}.")
        return LocalExecutor(workers)
    if kind == "ray":
        return RayExecutor(address, workers)
    raise GradlensError(f"`kind` should be one of ('local', 'ray'); found {kind!r}.")
