import math

import pytest

from leantrain.train.schedule import lr_factor


def test_warmup_then_cosine_reaches_zero():
    f = lr_factor("cosine", total_steps=110, warmup_steps=10)
    assert f(0) == pytest.approx(0.1)
    assert f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.5)
    assert f(110) == pytest.approx(0.0, abs=1e-12)


def test_linear_and_constant():
    lin = lr_factor("linear", total_steps=100)
    assert [lin(0), lin(50), lin(100)] == [1.0, 0.5, 0.0]
    assert all(lr_factor("constant", 100)(s) == 1.0 for s in range(0, 100, 7))
    assert math.isclose(lr_factor("constant", 100, warmup_steps=4)(1), 0.5)


def test_step_decay_multiplies_at_the_start_of_each_decay_epoch():
    f = lr_factor("step", total_steps=150, warmup_steps=0, steps_per_epoch=10, decay_epochs=[10, 13], decay_factor=0.1)
    assert [f(s) for s in (0, 99)] == [1.0, 1.0]
    assert math.isclose(f(100), 0.1) and math.isclose(f(129), 0.1)
    assert math.isclose(f(130), 0.01) and math.isclose(f(149), 0.01)
    warm = lr_factor("step", total_steps=150, warmup_steps=5, steps_per_epoch=10, decay_epochs=[1])
    assert warm(0) == 0.2 and warm(9) == 1.0 and math.isclose(warm(10), 0.1)
