"""Stopping training cleanly: the first SIGINT/SIGTERM lets the current update finish and the state
be saved; a second one interrupts at once."""

from __future__ import annotations

import signal
import threading


class StopSignals:
    """The first SIGINT/SIGTERM asks training to stop after the current update (and save); a second
    one interrupts at once. Only the main thread can own signal handlers; elsewhere this does nothing."""

    def __init__(self):
        self.received = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signum
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __exit__(self, *exc) -> None:
        self._restore()
