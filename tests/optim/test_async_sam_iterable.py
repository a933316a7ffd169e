"""An Ascent fed from an iterable of batches (a DataLoader) instead of row tensors: batches in order, cut to b' rows,
passes restarted, reproducible, and the same trajectory in the sequential, forked and spawned modes."""

import pytest
import torch
from async_sam_steps import train_steps
from torch import nn
from torch.utils.data import DataLoader

from leantrain.errors import ConfigError, LeantrainError
from leantrain.optim import Ascent, AsyncSAM
from leantrain.train import ClassificationTask


def _rows(n=96):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 5, generator=g)
    return {"x": x, "labels": (x[:, 0] > 0).long() + (x[:, 1] > 0).long()}


def _loader(n=64, batch_size=16, shuffle=True):
    rows = _rows(n)
    return DataLoader([{k: v[i] for k, v in rows.items()} for i in range(n)], batch_size=batch_size, shuffle=shuffle)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Dropout(0.2), nn.Linear(16, 3))


def _train(model, opt, steps=6, batch=16):
    return train_steps(model, opt, _rows(), steps, batch)


def test_batches_in_order_cut_to_b_prime_and_passes_restart():
    batches = [{"x": torch.full((4, 2), float(i)), "labels": torch.full((4,), i)} for i in range(3)]
    ascent = Ascent(lambda m, b: 0, batches, batch_size=3)
    got = [ascent.batch(v, 3) for v in range(7)]
    assert [int(b["labels"][0]) for b in got] == [0, 1, 2, 0, 1, 2, 0]  # one batch per ascent, a new pass after 3
    assert all(b["x"].shape == (3, 2) and b["labels"].shape == (3,) for b in got)
    whole = Ascent(lambda m, b: 0, batches, batch_size=None).batch(0, None)
    assert whole["x"].shape == (4, 2)
    pair = Ascent(lambda m, b: 0, [(torch.zeros(5, 2), torch.ones(5))], batch_size=2).batch(0, 2)
    assert isinstance(pair, tuple) and pair[0].shape == (2, 2) and pair[1].shape == (2,)


def test_shuffled_loader_is_reproducible_and_leaves_the_callers_rng_alone():
    def draws(ascent):
        return [ascent.batch(v, 16)["labels"].tolist() for v in range(6)]  # 6 batches: two passes of 4, then 2

    torch.manual_seed(5)
    first = draws(Ascent(lambda m, b: 0, _loader(), batch_size=16, seed=1))
    after = torch.rand(1)
    torch.manual_seed(11)  # another global RNG state: the same ascent batches
    assert draws(Ascent(lambda m, b: 0, _loader(), batch_size=16, seed=1)) == first
    torch.manual_seed(5)
    assert torch.equal(torch.rand(1), after)  # iterating the loader did not consume the caller's RNG
    assert draws(Ascent(lambda m, b: 0, _loader(), batch_size=16, seed=2)) != first
    assert first[0] != first[4]  # the second pass is shuffled anew


def test_bad_iterable_input():
    with pytest.raises(ConfigError, match="one-shot iterator"):
        Ascent(lambda m, b: 0, iter([{"x": torch.zeros(2)}]), batch_size=2)
    with pytest.raises(ConfigError, match="data=Tensor is invalid"):
        Ascent(lambda m, b: 0, torch.zeros(3, 2), batch_size=2)
    with pytest.raises(ConfigError, match="None .whole batches."):
        Ascent(lambda m, b: 0, [{"x": torch.zeros(2)}], batch_size=0)
    with pytest.raises(ConfigError, match="batch_size=None is invalid"):
        Ascent(lambda m, b: 0, _rows(), batch_size=None)  # rows need a size
    with pytest.raises(LeantrainError, match="yielded no batch"):
        Ascent(lambda m, b: 0, [], batch_size=2).batch(0, 2)


@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_two_process_with_a_loader_matches_the_sequential_mode(start):
    kw = {"rho": 0.1, "lr": 0.1, "momentum": 0.9}
    a, b = _model(), _model()
    _train(a, AsyncSAM(a.parameters(), model=a, ascent=Ascent(ClassificationTask().loss, _loader(), 12, seed=4), **kw))
    ascent = Ascent(ClassificationTask().loss, _loader(), 12, seed=4)
    with AsyncSAM(b.parameters(), model=b, ascent=ascent, mode="two_process", worker_start=start, **kw) as opt:
        _train(b, opt)
        assert opt.async_stats["misses"] == 0 and opt.async_stats["ascent_batch_size"] == {12: 5}
    assert ascent._stream is None  # the worker iterated its own copy
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_whole_batches_are_counted_by_their_rows():
    model = _model()
    ascent = Ascent(ClassificationTask().loss, _loader(batch_size=10), batch_size=None)
    with AsyncSAM(model.parameters(), lr=0.1, model=model, ascent=ascent, mode="two_process") as opt:
        _train(model, opt, steps=4)
        assert opt.async_stats["ascent_batch_size"] == {10: 3}
    assert ascent.gradient(model, 0, None) == 10  # rows of the batch it used
