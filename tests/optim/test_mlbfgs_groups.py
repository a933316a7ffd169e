"""MLBFGS with param groups added after construction, and checkpoints that do not fit the optimizer."""

import copy
import io

import pytest
import torch
from torch import nn

from leantrain.errors import ConfigError
from leantrain.optim.mlbfgs import MLBFGS

# a pair every 2 steps, so preconditioning starts at a block's 4th step
_SETTINGS = dict(
    lr=0.05, momentum=0.9, weight_decay=1e-3, beta_param=0.9, beta_grad=0.9, beta_pair=0.5, update_freq=2,
    history_size=3,
)  # fmt: skip


def _batches(n, seed=4):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(n)]


def _mlp(hidden=12):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, hidden), nn.Tanh(), nn.Linear(hidden, 3))


def _step(model, opt, x, y, drop=()):
    model.zero_grad(set_to_none=True)  # also the grads of params the optimizer does not hold yet
    nn.functional.cross_entropy(model(x), y).backward()
    for p in drop:
        p.grad = None
    opt.step()


def _has_history(opt, p):
    return "hist_sy" in opt.state[p] and opt.state[p]["hist_sy"].numel() > 0


@pytest.mark.parametrize("blocks", ["group", "param"])
@pytest.mark.parametrize("add_at", [0, 5])
def test_added_group_steps_exactly_as_a_group_given_at_construction(blocks, add_at):
    """Group B added after `add_at` steps == B in the optimizer from the start with no gradient for those steps."""
    batches = _batches(14)
    group_b = dict(lr=0.03, weight_decay=1e-2)  # B's own settings must be used for B

    ref = _mlp()
    a_ref, b_ref = list(ref[0].parameters()), list(ref[2].parameters())
    ref_opt = MLBFGS([{"params": a_ref}, {"params": b_ref, **group_b}], blocks=blocks, **_SETTINGS)
    for t, (x, y) in enumerate(batches):
        _step(ref, ref_opt, x, y, drop=b_ref if t < add_at else ())

    model = _mlp()
    a, b = list(model[0].parameters()), list(model[2].parameters())
    opt = MLBFGS([{"params": a}], blocks=blocks, **_SETTINGS)
    for t, (x, y) in enumerate(batches):
        if t == add_at:
            opt.add_param_group({"params": b, **group_b})
        _step(model, opt, x, y)

    for p_ref, p in zip(ref.parameters(), model.parameters(), strict=True):
        assert torch.equal(p_ref, p)
    assert _has_history(opt, b[0])  # B's own curvature pairs precondition its last steps

    # and its checkpoint is the one of the optimizer built with [A, B]: it resumes there bit-exactly
    resumed_opt = MLBFGS([{"params": a_ref}, {"params": b_ref, **group_b}], blocks=blocks, **_SETTINGS)
    resumed_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # torch's state dict aliases the live state
    for x, y in _batches(4, seed=5):
        _step(ref, resumed_opt, x, y)
        _step(model, opt, x, y)
    for p_ref, p in zip(ref.parameters(), model.parameters(), strict=True):
        assert torch.equal(p_ref, p)


def test_added_group_is_preconditioned_not_plain_momentum_sgd():
    """Without direction scaling B's block is independent of A: it moves as B alone under MLBFGS, not as SGD."""
    c = torch.linspace(0.1, 10.0, 5, dtype=torch.float64)  # f(b) = ½ Σ cᵢ bᵢ², condition number 100
    kw = dict(_SETTINGS, weight_decay=0.0, direction_scaling="none")

    def loss(a, b):
        return (a - 1).square().sum() + 0.5 * (c * b * b).sum()

    a = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    b, b_alone, b_sgd = (torch.ones(5, dtype=torch.float64, requires_grad=True) for _ in range(3))
    opt = MLBFGS([a], **kw)
    opt.add_param_group({"params": [b]})
    alone = MLBFGS([b_alone], **kw)
    sgd = torch.optim.SGD([b_sgd], lr=kw["lr"], momentum=kw["momentum"])
    for t in range(10):
        for o, params in ((opt, (a, b)), (alone, (a.detach(), b_alone)), (sgd, (a.detach(), b_sgd))):
            o.zero_grad()
            loss(*params).backward()
            o.step()
        assert torch.equal(b, b_alone)
        if t < 3:  # warm-up (2T = 4 steps): plain SGD with momentum
            torch.testing.assert_close(b, b_sgd, rtol=1e-14, atol=1e-15)
    assert _has_history(opt, b)
    assert (b - b_sgd).norm() > 1e-2 * b_sgd.norm()


def test_added_group_with_listed_blocks_is_one_block_and_bad_group_is_rejected():
    a, b1, b2 = (torch.ones(n, requires_grad=True) for n in (2, 3, 4))
    opt = MLBFGS([a], blocks=[[a]], **_SETTINGS)
    opt.add_param_group({"params": [b1, b2]})
    for _ in range(6):
        opt.zero_grad()
        (a.square().sum() + (b1 * b1).sum() + (b2 * b2 * b2).sum()).backward()
        opt.step()
    assert _has_history(opt, b1) and opt.state[b1]["hist_s"].shape[1] == 7  # one block over b1 and b2
    assert "hist_sy" not in opt.state[b2]

    with pytest.raises(ConfigError, match=r"param_groups\[2\]\.lr=-1.0"):
        opt.add_param_group({"params": [torch.ones(2, requires_grad=True)], "lr": -1.0})
    assert len(opt.param_groups) == 2  # the rejected group is not kept


def _checkpoint(model, **kw):
    """The state dict after 6 steps (history exists), through torch.save / torch.load as a run would."""
    opt = MLBFGS(model.parameters(), **_SETTINGS, **kw)
    for x, y in _batches(6):
        _step(model, opt, x, y)
    assert any(_has_history(opt, p) for p in model.parameters())
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_checkpoint_of_another_model_shape_raises_at_load():
    ckpt = _checkpoint(_mlp(hidden=12))  # 4 params, as _mlp(hidden=10); one block each
    opt = MLBFGS(_mlp(hidden=10).parameters(), **_SETTINGS)
    with pytest.raises(ConfigError, match=r"param_groups\[0\]\.params\[0\] has momentum_buffer of shape \(12, 6\), "
                       r"expected \(10, 6\)"):  # fmt: skip
        opt.load_state_dict(ckpt)
    assert not opt.state  # nothing was loaded


def test_checkpoint_with_other_blocks_or_groups_raises_at_load():
    model = _mlp()
    ckpt = _checkpoint(_mlp(), blocks="param")
    with pytest.raises(ConfigError, match="checkpoint has 4 blocks, this optimizer has 1"):
        MLBFGS(model.parameters(), **_SETTINGS).load_state_dict(ckpt)

    ckpt = _checkpoint(_mlp(), blocks="param")
    del ckpt["mlbfgs_blocks"]  # a checkpoint without the saved partition is still checked by its state
    with pytest.raises(ConfigError, match=r"param_groups\[0\]\.params\[1\] holds block state"):
        MLBFGS(model.parameters(), **_SETTINGS).load_state_dict(ckpt)

    ckpt = _checkpoint(_mlp())
    del ckpt["mlbfgs_blocks"]
    with pytest.raises(ConfigError, match=r"block 0 .* has ema_param of shape \(123,\), expected \(72,\)"):
        MLBFGS(model.parameters(), blocks="param", **_SETTINGS).load_state_dict(ckpt)

    ps = list(model.parameters())
    with pytest.raises(ConfigError, match="checkpoint has 1 param groups, this optimizer has 2"):
        MLBFGS([{"params": ps[:2]}, {"params": ps[2:]}], **_SETTINGS).load_state_dict(ckpt)
    with pytest.raises(ConfigError, match=r"checkpoint param_groups\[0\] has 4 params, .* has 2"):
        MLBFGS(ps[:2], **_SETTINGS).load_state_dict(ckpt)
    MLBFGS(model.parameters(), **_SETTINGS).load_state_dict(ckpt)  # the matching one loads, without the partition
