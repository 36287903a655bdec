"""Ctrl-C between steps, never inside one: the ranks of a tensor-parallel engine stay in step."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """A SIGINT that arrives inside the block raises KeyboardInterrupt when the block ends.

    Rank 0 sends a step to the workers before running its own part of it: an interrupt
    between the two would leave the workers inside a collective rank 0 never joins, and
    the next step's collectives would pair with theirs. Steps take milliseconds, so the
    interrupt waits for the one under way. Only the main thread receives signals; other
    threads need no deferral."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt
