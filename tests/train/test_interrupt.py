"""Ctrl-C handling helpers: a Ctrl-C that Python drops (inside a ``__del__``) is still recorded."""

import gc
import os
import signal

import pytest

from leantrain.train.interrupt import recorded_sigint


class _SignalsWhileCollected:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)  # the handler's KeyboardInterrupt is raised here, and Python drops it


def test_a_ctrl_c_lost_inside_a_finalizer_is_still_recorded():
    before = signal.getsignal(signal.SIGINT)
    with recorded_sigint() as interrupted:
        obj = _SignalsWhileCollected()
        del obj  # the interrupt raised in __del__ is printed as "Exception ignored" and does not propagate
        gc.collect()
        assert interrupted.is_set()
        with pytest.raises(KeyboardInterrupt):  # outside a finalizer it interrupts at once, as usual
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before
