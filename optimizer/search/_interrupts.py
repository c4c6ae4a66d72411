"""Ctrl-C that never lands inside a storage write (see :class:`Interrupts`)."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["Interrupted", "Interrupts"]


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, after the storage was left consistent; ``trial`` is the number cut short, if any."""

    def __init__(self, trial: int | None):
        super().__init__()
        self.trial = trial


class Interrupts:
    """Ctrl-C that never lands inside a storage write.

    SIGINT raises KeyboardInterrupt at once while this worker merges, scores, starts an engine or
    waits: that is where its time goes, and nothing there is half written. Anywhere else (Optuna
    asking for a trial, telling its result, writing attrs) the signal is noted and raised at the
    next safe point, so no trial is left half recorded. Inert outside the main thread, where no
    signal arrives anyway.
    """

    def __init__(self) -> None:
        self.pending = False
        self._open = 0
        self._installed = False
        self._previous: Any = None

    def __enter__(self) -> Interrupts:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False

    def _handle(self, signum: int, frame: object) -> None:
        self.pending = True
        if self._open:
            raise KeyboardInterrupt

    def check(self) -> None:
        """A safe point: raise a Ctrl-C that arrived while it could not be raised."""
        if self.pending:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def allowed(self) -> Iterator[None]:
        """A block a Ctrl-C may interrupt at once."""
        self.check()
        self._open += 1
        try:
            yield
        finally:
            self._open -= 1
