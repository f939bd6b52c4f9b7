"""The next updates' batches, made by a background thread while the current update trains.

Reading a batch's rows from the tokenized cache and padding them takes a CPU a millisecond or so: on
a CPU that trains for a second per update it is nothing (``data_share`` in ``metrics.jsonl``: 0.1%),
but a GPU update can take less than that. So on CUDA (``train.prefetch: auto``) a thread makes the
batches of the next ``depth`` updates, in pinned host memory so that the copy to the GPU can overlap
the computation (``Batch.to`` copies with ``non_blocking``).

The thread walks a copy of the loop's position in the data; the loop's own ``TrainState``, which
checkpoints save, advances only as updates are taken, so resuming never skips what was prefetched
and not used. Each prefetched update is checked against the indices the loop itself draws.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from mt.batch import Batch

_END = object()  # the shadow stream ran out of updates


def _same(a, b) -> bool:
    """Equal updates: lists or tuples of the same items, index arrays of the same indices."""
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return bool(np.array_equal(a, b))


class Prefetcher:
    """``get(indices)``: the batches of the next update, made ahead by a thread from ``updates``
    (an iterator of each update's list of what ``make`` takes for each of this rank's batches, in
    the order the loop takes them; in training, (epoch, example indices));
    with ``depth`` 0, made when asked for, in the caller's thread. A context manager: leaving it stops
    the thread."""

    def __init__(self, updates: Iterator[list[Any]], make: Callable[[Any], Batch], *,
                 depth: int = 2, pin: bool = False):
        self._make = make
        self._queue: queue.Queue = queue.Queue(maxsize=max(depth, 1))
        self._stop = threading.Event()
        self._thread = (threading.Thread(target=self._work, args=(updates, make, pin), daemon=True,
                                         name="mt-prefetch") if depth else None)
        if self._thread is not None:
            self._thread.start()

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _work(self, updates: Iterator[list[Any]], make: Callable[[Any], Batch], pin: bool) -> None:
        try:
            for indices in updates:
                batches = [make(i) for i in indices]
                if pin:
                    batches = [Batch(b.src.pin_memory(), b.tgt_in.pin_memory(), b.tgt_out.pin_memory(), b.indices)
                               for b in batches]
                if not self._put((indices, batches)):
                    return
            self._put((_END, None))
        except BaseException as e:  # reaches the loop, which raises it
            self._put((e, None))

    def _put(self, item: tuple) -> bool:
        """Queue ``item`` unless told to stop first; whether it was queued."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def get(self, indices: list[Any]) -> list[Batch]:
        """The batches of the update whose (this rank's) example indices are ``indices``."""
        if self._thread is None:
            return [self._make(i) for i in indices]
        made, batches = self._queue.get()
        if isinstance(made, BaseException):
            raise made
        if made is _END or not _same(made, indices):
            raise RuntimeError("the prefetched batches are not the update's: the prefetcher lost its place")
        return batches

    def close(self) -> None:
        """Stop the thread (it may be waiting to queue an update nobody will take) and wait for it."""
        self._stop.set()
        if self._thread is None:
            return
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.1)
            except queue.Empty:
                pass
        self._thread.join()
