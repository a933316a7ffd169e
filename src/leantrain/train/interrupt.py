"""Ctrl-C that lets the work in progress finish: the first one sets a flag the loop checks between steps (it then
checkpoints and stops), a second one interrupts at once. The supervised loop, the federated runner (between rounds)
and the MARL runner (between collected batches) all use it (:func:`deferred_sigint`). :func:`recorded_sigint`
interrupts at once and also records the Ctrl-C, for commands that stop between stages (``leantrain compress``).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator

Handler = Callable[[int, object], None]


@contextlib.contextmanager
def _sigint_handled(make_handler: Callable[[threading.Event, object], Handler]) -> Iterator[threading.Event]:
    """SIGINT handled by ``make_handler(event, previous handler)`` inside the block (main thread only: elsewhere
    signals cannot be handled, and the event just never gets set); the previous handler is restored after it."""
    event = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield event
        return
    previous = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, make_handler(event, previous))
    try:
        yield event
    finally:
        signal.signal(signal.SIGINT, previous)


def deferred_sigint() -> contextlib.AbstractContextManager[threading.Event]:
    """Turn the first Ctrl-C into a flag the loop checks between steps; a second one interrupts at once."""

    def make_handler(event: threading.Event, previous) -> Handler:
        def handler(signum, frame):
            if event.is_set():
                signal.signal(signal.SIGINT, previous)
                raise KeyboardInterrupt
            event.set()

        return handler

    return _sigint_handled(make_handler)


def recorded_sigint() -> contextlib.AbstractContextManager[threading.Event]:
    """Ctrl-C raises KeyboardInterrupt at once, as usual, and is also recorded in the yielded event.

    Python drops an exception raised inside a ``__del__`` or a weakref callback ("Exception ignored in ..."), so a
    Ctrl-C that lands there is lost. A caller checks the event at its next stage and raises it again."""

    def make_handler(event: threading.Event, previous) -> Handler:
        def handler(signum, frame):
            event.set()
            raise KeyboardInterrupt

        return handler

    return _sigint_handled(make_handler)
