"""Stopping cleanly: a signal asks for a checkpoint after the current optimizer step."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any


class StopRequest:
    """SIGINT/SIGTERM set a flag; the loop checks it after each optimizer step, saves a checkpoint and
    returns. A second signal stops at once (KeyboardInterrupt)."""

    def __init__(self, signals: Sequence[int] = (signal.SIGINT, signal.SIGTERM)) -> None:
        self.reason: str | None = None
        self.signals = tuple(signals)
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.reason is not None:
            raise KeyboardInterrupt
        self.reason = signal.Signals(signum).name
        print(
            f"\n{self.reason} received: saving a checkpoint after this optimizer step, then stopping "
            "(send it again to stop immediately)",
            file=sys.stderr,
            flush=True,
        )

    def request(self, reason: str) -> None:
        self.reason = self.reason or reason
