"""The bounded queue and the thread behind every piece of reporting work a worker does.

Recording (:mod:`~authmilter.reports.store`), the history file
(:mod:`~authmilter.reports.history`) and failure reports (:mod:`~authmilter.reports.failure`)
all take an item from a libmilter thread and must never make it wait: the item goes into a
bounded queue of this process without blocking (a full queue refuses it, and the caller counts
the drop), and one daemon thread works the queue off in batches (up to ``batch`` items, or
whatever came within ``interval`` seconds of the first). :meth:`Background.close`, called by a
stopping worker, works off what is queued within the time given and reports what is left.

The thread starts at the first item, so never in the supervisor (which handles no mail) and
always after the fork (threads do not survive one); ``pid`` lets the owner of a process-wide
instance recognise one inherited through a fork and replace it.

The standard library's :mod:`queue` and :mod:`threading` do the work; this class only gives the
three users one copy of the batching, the start and the bounded stop.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from typing import Any

__all__ = ["Background"]

_STOP = object()  # wakes the thread at close()


class Background:
    """A bounded queue and the thread that works it off in batches (see the module docstring).

    Subclasses say what a batch is worth (:meth:`handle`) and what to do with what was left at
    the stop (:meth:`left_at_stop`); :meth:`finish` runs in the thread when it ends.

    :param maxsize: items the queue holds; one more is refused.
    :param batch: items handed to :meth:`handle` at once, at most.
    :param interval: seconds a batch waits for more items after its first.
    :param start: start the thread at the first :meth:`offer` (``False``: only :meth:`start`
        or :meth:`close` do, for tests that fill the queue first).
    """

    #: The thread's name (``ps -L``, ``py-spy``).
    THREAD_NAME = "authmilter-background"

    def __init__(self, *, maxsize: int, batch: int, interval: float, start: bool) -> None:
        self.pid = os.getpid()
        self.batch = batch
        self.interval = interval
        self.queue: queue.Queue[object] = queue.Queue(maxsize)
        self._autostart = start
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closing = False

    # -- the milter's side ----------------------------------------------------------------

    def offer(self, item: object) -> bool:
        """Queue ``item`` without waiting; ``False`` when it was refused (queue full or
        closed): the caller counts and says that."""
        if self._autostart and self._thread is None:
            self.start()
        if self._closing:
            return False
        try:
            self.queue.put_nowait(item)
        except queue.Full:
            return False
        return True

    def start(self) -> None:
        """Start the thread (once)."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name=self.THREAD_NAME)  # fmt: skip
                self._thread.start()

    def close(self, timeout: float = 1.0) -> bool:
        """Work off what is queued and stop the thread, waiting at most ``timeout`` seconds.

        :returns: whether the queue was worked off in time; what is left goes to
            :meth:`left_at_stop`.
        """
        self._closing = True
        self.start()
        with contextlib.suppress(queue.Full):
            self.queue.put_nowait(_STOP)
        assert self._thread is not None
        self._thread.join(max(0.0, timeout))
        if self._thread.is_alive():
            left = sum(1 for item in list(self.queue.queue) if item is not _STOP)
            if left:
                self.left_at_stop(left)
            return False
        return True

    # -- for subclasses -------------------------------------------------------------------

    def handle(self, items: list[Any]) -> None:
        """Work off one batch (in the thread). It must not raise."""
        raise NotImplementedError

    def left_at_stop(self, n: int) -> None:
        """``n`` items were still queued when :meth:`close` gave up waiting."""

    def finish(self) -> None:
        """The thread is about to end (close a connection, say)."""

    # -- the thread -------------------------------------------------------------------------

    def _gather(self) -> tuple[list[Any], bool]:
        """The next batch, and whether the thread is to stop after it."""
        try:
            first = self.queue.get(timeout=0.1 if self._closing else 1.0)
        except queue.Empty:
            return [], self._closing  # closing and drained (the stop may not have fitted)
        if first is _STOP:
            return [], True
        items = [first]
        deadline = time.monotonic() + self.interval
        while len(items) < self.batch:
            wait = 0.0 if self._closing else deadline - time.monotonic()
            try:
                item = self.queue.get(timeout=wait) if wait > 0 else self.queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                return items, True
            items.append(item)
        return items, False

    def _run(self) -> None:
        stop = False
        try:
            while not (stop and self.queue.empty()):
                items, stop_now = self._gather()
                stop = stop or stop_now
                if items:
                    self.handle(items)
        finally:
            self.finish()
