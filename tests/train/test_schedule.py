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
