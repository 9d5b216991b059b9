"""A sink that logs on a background thread, so that no dashboard ever blocks the training step.

:class:`QueuedSink` takes each snapshot from the profiler (``add_snapshot`` only appends to a
queue), and a worker thread turns it into scalars (:func:`gradlens.sinks._scalars.snapshot_scalars`)
and, every ``image_every`` probes, a heatmap image, and hands both to the backend
(``_write``, ``_write_meta``, ``_finish``: subclasses).

When the worker falls behind, images are dropped first: a heatmap is skipped when
``max_pending_images`` images are already waiting; scalars are dropped (the oldest first) only when
``max_pending`` snapshots are waiting. Each kind of drop is said once, as a
:class:`~gradlens.GradlensWarning` on the training thread, and counted in ``dropped_images`` /
``dropped_scalars``. An error raised by the backend stops the worker and is raised again (as a
:class:`~gradlens.GradlensError` naming the sink) by the next ``add_snapshot``, ``flush`` or
``close``.
"""

from __future__ import annotations

import threading
import warnings
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Mapping
from typing import Any

from gradlens._errors import GradlensError, GradlensWarning
from gradlens._validate import check_int
from gradlens.sinks._scalars import heatmap_rgb, snapshot_scalars
from gradlens.snapshot import Snapshot

__all__ = ["QueuedSink"]


class QueuedSink(ABC):
    """Base of the dashboard sinks: a bounded queue drained by one worker thread.

    Args:
        image_every: log the cosine heatmap every this many snapshots (the first one included);
            0 logs none. Needs the ``plot`` extra and at least two tasks.
        pair_limit: log each pair's cosine only for at most this many tasks.
        layer_limit: log per-layer scalars only for at most this many layers.
        max_pending: snapshots that may wait before the oldest is dropped.
        max_pending_images: heatmaps that may wait before new ones are skipped.
    """

    def __init__(
        self,
        *,
        image_every: int = 10,
        pair_limit: int = 10,
        layer_limit: int = 64,
        max_pending: int = 1000,
        max_pending_images: int = 2,
    ) -> None:
        self.image_every: int = check_int("image_every", image_every, minimum=0)
        self.pair_limit: int = check_int("pair_limit", pair_limit, minimum=0)
        self.layer_limit: int = check_int("layer_limit", layer_limit, minimum=0)
        self.max_pending: int = check_int("max_pending", max_pending, minimum=1)
        self.max_pending_images: int = check_int(
            "max_pending_images", max_pending_images, minimum=0
        )
        if image_every:
            from gradlens._errors import require

            require("matplotlib", "plot", f"{type(self).__name__}(image_every={image_every})")
        #: Snapshots (their scalars) and heatmaps dropped because the worker fell behind.
        self.dropped_scalars = 0
        self.dropped_images = 0
        #: The scalars of the latest snapshot written, by name.
        self.last: dict[str, float] = {}
        self._seen = 0
        self._said_images = False
        self._queue: deque[tuple[str, Any, bool]] = deque()
        self._images = 0
        self._busy = False
        self._closed = False
        self._finished = False
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    # -- public ----------------------------------------------------------------------------------
    def add_snapshot(self, snap: Snapshot) -> None:
        """Queue one snapshot (returns at once; the worker logs it)."""
        self._raise_error()
        if self._closed:
            raise GradlensError(f"Cannot log to {self!r}: the sink is closed.")
        image = bool(self.image_every) and len(snap.tasks) > 1
        image = image and self._seen % self.image_every == 0
        self._seen += 1
        warn = []
        with self._cond:
            oldest = next((i for i, it in enumerate(self._queue) if it[0] == "snap"), None)
            if len(self._queue) >= self.max_pending and oldest is not None:
                lost_image = self._queue[oldest][2]
                self._images -= lost_image
                self.dropped_images += lost_image
                del self._queue[oldest]
                self.dropped_scalars += 1
                if self.dropped_scalars == 1:
                    warn.append(
                        f"{type(self).__name__} is falling behind the training loop: "
                        f"{self.max_pending} snapshots wait, the oldest are dropped; said "
                        "once, counted in `dropped_scalars`."
                    )
            if image and self._images >= self.max_pending_images:
                image = False
                self.dropped_images += 1
                if not self._said_images:
                    self._said_images = True
                    warn.append(
                        f"{type(self).__name__} is falling behind the training loop: heatmap "
                        f"images are skipped while {self.max_pending_images} wait (scalars are "
                        "still logged); said once, counted in `dropped_images`."
                    )
            self._queue.append(("snap", snap, image))
            self._images += image
            self._start()
            self._cond.notify_all()
        for message in warn:
            warnings.warn(message, GradlensWarning, stacklevel=2)

    def update_meta(self, **fields: Any) -> None:
        """Queue run metadata (the profiler passes its ``meta`` here when it starts)."""
        self._raise_error()
        if self._closed:
            raise GradlensError(f"Cannot log to {self!r}: the sink is closed.")
        with self._cond:
            self._queue.append(("meta", dict(fields), False))
            self._start()
            self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued is written; False if ``timeout`` seconds passed first."""
        with self._cond:
            done = self._cond.wait_for(
                lambda: (not self._queue and not self._busy) or self._error is not None, timeout
            )
        self._raise_error()
        return bool(done)

    def close(self) -> None:
        """Write what is queued, stop the worker and finish the backend; idempotent."""
        if self._finished:
            return
        self._closed = self._finished = True
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        try:
            self._raise_error()
        finally:
            self._finish()

    def __enter__(self) -> QueuedSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- backend (subclasses) --------------------------------------------------------------------
    @abstractmethod
    def _write(self, step: int, scalars: Mapping[str, float], rgb: Any | None) -> None:
        """Log one snapshot's scalars and, when one is due, its heatmap (an ``(H, W, 3)`` uint8
        array; else None), in one call where the library allows (worker thread)."""

    @abstractmethod
    def _write_meta(self, meta: Mapping[str, Any]) -> None:
        """Log the run's meta (worker thread)."""

    @abstractmethod
    def _finish(self) -> None:
        """End the backend's run if the sink started it (the caller's thread, after the drain)."""

    # -- worker ----------------------------------------------------------------------------------
    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._work, name=f"gradlens-{type(self).__name__}", daemon=True
            )
            self._thread.start()

    def _work(self) -> None:
        while True:
            with self._cond:
                self._busy = False
                self._cond.notify_all()
                self._cond.wait_for(lambda: bool(self._queue) or self._closed)
                if not self._queue:
                    return  # closed and drained
                kind, item, image = self._queue.popleft()
                self._busy = True
            try:
                if kind == "meta":
                    self._write_meta(item)
                else:
                    self._write_snapshot(item, image)
            except BaseException as exc:
                with self._cond:
                    self._error = exc
                    self._queue.clear()
                    self._busy = False
                    self._cond.notify_all()
                return
            finally:
                if image:
                    with self._cond:
                        self._images -= 1

    def _write_snapshot(self, snap: Snapshot, image: bool) -> None:
        scalars = snapshot_scalars(snap, pair_limit=self.pair_limit, layer_limit=self.layer_limit)
        self._write(int(snap.step), scalars, heatmap_rgb(snap) if image else None)
        self.last = scalars

    def _raise_error(self) -> None:
        exc = self._error
        if exc is not None:
            self._error = None
            self._closed = True
            raise GradlensError(
                f"{type(self).__name__} stopped logging: its backend raised "
                f"{type(exc).__name__}: {exc}"
            ) from exc
