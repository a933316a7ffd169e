"""Ctrl-C that lets the work in progress finish: the first one sets a flag the loop checks between steps (it then
checkpoints and stops), a second one interrupts at once. The supervised loop, the federated runner (between rounds)
and the MARL runner (between collected batches) all use it.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def deferred_sigint() -> Iterator[threading.Event]:
    """Turn the first Ctrl-C into a flag the loop checks between steps; a second one interrupts at once."""
    event = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield event
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        if event.is_set():
            signal.signal(signal.SIGINT, previous)
            raise KeyboardInterrupt
        event.set()

    signal.signal(signal.SIGINT, handler)
    try:
        yield event
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def recorded_sigint() -> Iterator[threading.Event]:
    """Ctrl-C raises KeyboardInterrupt at once, as usual, and is also recorded in the yielded event.

    Python drops an exception raised inside a ``__del__`` or a weakref callback ("Exception ignored in ..."), so a
    Ctrl-C that lands there is lost. A caller checks the event at its next stage and raises it again."""
    event = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield event
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        event.set()
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    try:
        yield event
    finally:
        signal.signal(signal.SIGINT, previous)
