"""LW-SAM's truncated second pass (prefix replay) and its warm-up before the first layer selection."""

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from leantrain.errors import ConfigError
from leantrain.optim import LayerwiseSAM, sam_training_step
from leantrain.optim.prefix_replay import PrefixReplay
from leantrain.optim.sam import bn_stats_frozen


class Block(nn.Module):
    def __init__(self, c, inplace=False):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.act = nn.ReLU(inplace=inplace)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return self.act(self.bn2(self.conv2(out)) + x)


class Net(nn.Module):
    """A small residual CNN: stem, four blocks, head (the shape of ResNet-20)."""

    def __init__(self, inplace=False):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
        self.blocks = nn.Sequential(*[Block(4, inplace) for _ in range(4)])
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


def _net(inplace=False, seed=0):
    torch.manual_seed(seed)
    return Net(inplace).double()


def _batch(n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def _closure(model, opt, x, y):
    def closure():
        opt.zero_grad(set_to_none=True)
        with bn_stats_frozen(model) if opt._perturbed else torch.enable_grad():
            loss = F.cross_entropy(model(x), y)
            loss.backward()
        return loss

    return closure


def _pin(opt, names):
    """Fix the selection to the named layers for the whole run."""
    opt.selection = tuple(opt.layer_names.index(n) for n in names)
    opt.select_layers = lambda: opt.selection


def _train(second_pass, names, steps=4, inplace=False, **kw):
    model = _net(inplace)
    opt = LayerwiseSAM(model, lr=0.1, momentum=0.9, second_pass=second_pass, num_layers=len(names), **kw)
    _pin(opt, names)
    replayed = []
    for step in range(steps):
        x, y = _batch(seed=step)
        opt.step(_closure(model, opt, x, y))
        replayed.append(opt.last_replayed)
    return model, opt, replayed


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize(
    "names",
    [("head",), ("blocks.3.conv2", "head"), ("blocks.2.conv1", "blocks.3.bn2"), ("blocks.1.bn1", "head")],
)
def test_truncated_pass_gives_bitwise_the_masked_weights_and_batchnorm_buffers(names):
    masked, _, none_replayed = _train("masked", names)
    truncated, opt, replayed = _train("truncated", names)
    assert set(none_replayed) == {0}
    assert min(replayed) > 0  # the prefix really was replayed
    assert _same_state(masked, truncated)  # weights and running statistics


def test_nothing_is_replayed_when_the_first_layer_is_chosen():
    masked, _, _ = _train("masked", ("stem.0", "head"))
    truncated, _, replayed = _train("truncated", ("stem.0", "head"))
    assert set(replayed) == {0}
    assert _same_state(masked, truncated)


def test_outermost_finished_modules_are_replayed():
    _, opt, _ = _train("truncated", ("blocks.2.conv2", "head"), steps=1)
    # stem, blocks 0 and 1 finished before blocks.2.conv2; inside block 2, conv1/bn1 did too
    assert opt.replay.replayed_modules == ["stem", "blocks.0", "blocks.1", "blocks.2.conv1", "blocks.2.bn1"]


def _second_pass_flops(second_pass, names):
    model = _net()
    opt = LayerwiseSAM(model, lr=0.1, second_pass=second_pass, num_layers=len(names))
    _pin(opt, names)
    x, y = _batch()
    _closure(model, opt, x, y)()
    opt.first_step()
    with FlopCounterMode(display=False) as counter:
        _closure(model, opt, x, y)()
    opt.second_step()
    return counter.get_total_flops()


def test_truncated_second_pass_computes_only_the_suffix():
    names = ("blocks.3.conv1", "head")
    masked, truncated = _second_pass_flops("masked", names), _second_pass_flops("truncated", names)
    # stem + 3 of 4 blocks are skipped: well under half of the masked pass
    assert truncated < 0.4 * masked


def test_inplace_activations_on_fresh_tensors_keep_the_replay_exact():
    names = ("blocks.3.conv2", "head")
    masked, _, _ = _train("masked", names, inplace=True)
    truncated, opt, replayed = _train("truncated", names, inplace=True)
    assert _same_state(masked, truncated)
    assert min(replayed) > 0  # the in-place ReLU acts on the residual sum, not on a recorded module output


def test_inplace_modification_of_a_recorded_output_bans_its_replay():
    class Inplace(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            h = self.a(x)
            h.mul_(2.0)  # the recorded output of `a` changes after it was recorded
            return self.c(torch.tanh(self.b(h)))

    torch.manual_seed(0)
    model = Inplace().double()
    opt = LayerwiseSAM(model, lr=0.1, num_layers=1)
    _pin(opt, ("c",))
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 2, (8,))
    reference = copy.deepcopy(model)
    ref_opt = LayerwiseSAM(reference, lr=0.1, num_layers=1, second_pass="masked")
    _pin(ref_opt, ("c",))
    for m, o in ((model, opt), (reference, ref_opt)):
        o.step(_closure(m, o, x, y))
    assert opt.replay.replayed_modules == ["b"]  # `a` is banned, `b` (after it) is replayed
    assert _same_state(model, reference)


def test_a_second_pass_on_other_inputs_runs_in_full():
    model = _net()
    opt = LayerwiseSAM(model, lr=0.1, num_layers=1)
    _pin(opt, ("head",))
    x, y = _batch()
    _closure(model, opt, x, y)()
    opt.first_step()
    assert opt.last_replayed > 0
    _closure(model, opt, x + 1.0, y)()  # not the batch of the first pass: nothing may be replayed
    assert opt.replay.stats["full_forwards"] == 1 and opt.replay.stats["replayed_forwards"] == 0
    opt.second_step()


def test_the_same_tensor_modified_in_place_is_other_input():
    model = _net()
    replay = PrefixReplay(model)
    x, _ = _batch()
    model(x).sum().backward()
    replay.arm(list(model.head.parameters()))
    x.add_(1.0)
    model(x)
    assert replay.stats == {"replayed_forwards": 0, "full_forwards": 1}
    replay.close()


def test_micro_batches_replay_each_forward_of_the_window():
    names = ("blocks.3.conv1", "head")
    results = []
    for second_pass in ("masked", "truncated"):
        model = _net()
        opt = LayerwiseSAM(model, lr=0.1, momentum=0.9, num_layers=2, second_pass=second_pass)
        _pin(opt, names)
        for step in range(3):
            x, y = _batch(n=16, seed=step)
            micro = [(x[:8], y[:8]), (x[8:], y[8:])]
            sam_training_step(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), micro, opt)
        results.append((model, opt))
    (masked, _), (truncated, opt) = results
    assert opt.replay.stats["replayed_forwards"] == 6
    assert _same_state(masked, truncated)


def test_evaluation_under_no_grad_is_not_recorded_and_hooks_are_removed_on_close():
    model = _net()
    replay = PrefixReplay(model)
    with torch.no_grad():
        model(_batch()[0])
    assert len(replay.forwards) == 0
    replay.close()
    model(_batch()[0]).sum()
    assert len(replay.forwards) == 0


def test_truncated_needs_a_model():
    with pytest.raises(ConfigError, match="needs the model"):
        LayerwiseSAM(list(_net().parameters()), lr=0.1, second_pass="truncated")
    with pytest.raises(ConfigError, match="second_pass"):
        LayerwiseSAM(_net(), lr=0.1, second_pass="sideways")


# ------------------------------------------------------------ warm-up before the first selection


def test_warmup_steps_are_plain_base_optimizer_steps_with_one_pass():
    model, reference = _net(), _net()
    opt = LayerwiseSAM(model, lr=0.1, momentum=0.9, num_layers=2, select_after=3)
    sgd = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    calls = []
    for step in range(3):
        x, y = _batch(seed=step)
        assert opt.in_warmup and opt.needs_second_pass is False
        inner = _closure(model, opt, x, y)
        opt.step(lambda inner=inner: calls.append(1) or inner())
        sgd.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        sgd.step()
    assert len(calls) == 3 and opt.selection == ()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters(), strict=True))
    assert not opt.in_warmup and opt.needs_second_pass
    x, y = _batch(seed=9)
    opt.step(_closure(model, opt, x, y))
    assert len(opt.selection) == 2 and opt.selected_at == 3


def test_warmup_in_the_two_call_form_ignores_a_second_pass_and_sam_training_step_skips_it():
    model, reference = _net(), _net()
    opt = LayerwiseSAM(model, lr=0.1, num_layers=1, select_after=1)
    sgd = torch.optim.SGD(reference.parameters(), lr=0.1)
    x, y = _batch()
    _closure(model, opt, x, y)()
    opt.first_step()
    assert not opt.needs_second_pass and all(p.requires_grad for p in model.parameters())
    _closure(model, opt, x, y)()  # a loop that runs the second pass anyway: its gradient is ignored
    opt.second_step()
    F.cross_entropy(reference(x), y).backward()
    sgd.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters(), strict=True))

    model = _net()
    opt = LayerwiseSAM(model, lr=0.1, num_layers=1, select_after=1)
    forwards = []
    model.register_forward_hook(lambda *a: forwards.append(1))
    loss_fn = lambda m, b: F.cross_entropy(m(b[0]), b[1])  # noqa: E731
    sam_training_step(model, loss_fn, (x, y), opt)
    assert len(forwards) == 1  # warm-up: one pass
    sam_training_step(model, loss_fn, (x, y), opt)
    assert len(forwards) == 3  # then two


def test_reselection_counts_from_the_end_of_warmup():
    model = _net()
    opt = LayerwiseSAM(model, lr=0.05, num_layers=1, select_after=2, reselect_every=3)
    selected_at = []
    for step in range(9):
        x, y = _batch(seed=step)
        opt.step(_closure(model, opt, x, y))
        selected_at.append(opt.selected_at)
    assert selected_at == [-1, -1, 2, 2, 2, 5, 5, 5, 8]


def test_warmup_and_selection_survive_a_checkpoint():
    model = _net()
    opt = LayerwiseSAM(model, lr=0.1, num_layers=1, select_after=2, reselect_every=2)
    for step in range(3):
        x, y = _batch(seed=step)
        opt.step(_closure(model, opt, x, y))
    state = copy.deepcopy(opt.state_dict())
    clone = _net()
    clone.load_state_dict(model.state_dict())
    opt2 = LayerwiseSAM(clone, lr=0.1, num_layers=1, select_after=2, reselect_every=2)
    opt2.load_state_dict(state)
    for step in range(3, 6):
        x, y = _batch(seed=step)
        opt.step(_closure(model, opt, x, y))
        opt2.step(_closure(clone, opt2, x, y))
    assert _same_state(model, clone)


def test_select_after_is_checked():
    with pytest.raises(ConfigError, match="select_after"):
        LayerwiseSAM(_net(), lr=0.1, select_after=-1)


# ------------------------------------------------------------ regressions found in review (each failed before)


def _compare(make, names, setup=None, steps=3, between=None):
    """Train `make()` with truncated and masked second passes on the same batches; both final states."""
    out = []
    for second_pass in ("truncated", "masked"):
        torch.manual_seed(0)
        model = make().double()
        if setup is not None:
            setup(model)
        opt = LayerwiseSAM(model, lr=0.1, momentum=0.9, second_pass=second_pass, num_layers=len(names))
        _pin(opt, names)
        g = torch.Generator().manual_seed(1)
        for _ in range(steps):
            x, y = torch.randn(8, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)
            if between is not None:
                between(model, x)
            opt.step(_closure(model, opt, x, y))
        out.append((model, opt))
    return out


def test_a_weight_tied_to_an_earlier_module_makes_it_a_boundary():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.dec = nn.Linear(4, 4)  # holds the tied weight first in named_modules
            self.enc = nn.Linear(4, 4)
            self.enc.weight = self.dec.weight  # called first, with the same (perturbed) weight
            self.mid = nn.Sequential(nn.Tanh(), nn.Linear(4, 4), nn.Tanh())
            self.out = nn.Linear(4, 3)

        def forward(self, x):
            return self.out(self.dec(self.mid(self.enc(x))))

    (truncated, opt), (masked, _) = _compare(Net, ["dec"])
    assert opt.replay.replayed_modules == []
    assert _same_state(truncated, masked)


def test_a_weight_used_functionally_by_another_module_replays_nothing():
    class Proj(nn.Module):
        def __init__(self, owner):
            super().__init__()
            self.__dict__["owner"] = owner  # not a submodule: uses owner's weight functionally

        def forward(self, x):
            return F.linear(x, self.owner.weight)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Linear(4, 4, bias=False)  # never called itself
            self.proj = Proj(self.table)
            self.body = nn.Sequential(nn.Tanh(), nn.Linear(4, 4), nn.Tanh())
            self.out = nn.Linear(4, 3)

        def forward(self, x):
            return self.out(self.body(self.proj(x)))

    (truncated, opt), (masked, _) = _compare(Net, ["table", "out"])
    assert opt.last_replayed == 0
    assert _same_state(truncated, masked)


def _abc():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Tanh())
            self.b = nn.Linear(4, 4)
            self.out = nn.Linear(4, 3)

        def forward(self, x):
            return self.out(torch.tanh(self.b(self.a(x))))

    return Net()


def test_a_user_forward_hook_is_applied_once_on_a_replayed_output():
    (truncated, opt), (masked, _) = _compare(_abc, ["b", "out"], setup=lambda m: m.a.register_forward_hook(
        lambda module, args, output: output * 2.0))  # fmt: skip
    assert opt.replay.replayed_modules == ["a"]
    assert _same_state(truncated, masked)


def test_an_eval_mode_forward_on_the_same_batch_is_not_replayed():
    def metric_forward(model, x):
        model.eval()
        model(x)  # gradients on, eval-mode BatchNorm
        model.train()

    (truncated, opt), (masked, _) = _compare(_abc, ["b", "out"], between=metric_forward)
    assert opt.replay.replayed_modules == ["a"]
    assert _same_state(truncated, masked)
    assert len(opt.replay.forwards) == 0  # nothing held between steps


def test_an_output_object_that_may_hide_tensors_is_not_replayed():
    from dataclasses import dataclass

    @dataclass
    class Out:
        h: torch.Tensor

    class Enc(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(4, 4)

        def forward(self, x):
            return Out(self.l(x))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc, self.b, self.out = Enc(), nn.Linear(4, 4), nn.Linear(4, 3)

        def forward(self, x):
            return self.out(torch.tanh(self.b(self.enc(x).h.relu_())))

    (truncated, opt), (masked, _) = _compare(Net, ["b", "out"])
    assert "enc" not in opt.replay.replayed_modules
    assert _same_state(truncated, masked)


def test_warmup_with_a_grad_scaler_equals_the_scaled_base_step():
    model, reference = _net(), _net()
    opt = LayerwiseSAM(model, lr=0.1, num_layers=1, select_after=2)
    sgd = torch.optim.SGD(reference.parameters(), lr=0.1)
    s1, s2 = torch.amp.GradScaler("cpu", init_scale=2.0**4), torch.amp.GradScaler("cpu", init_scale=2.0**4)
    for step in range(2):
        x, y = _batch(seed=step)
        opt.zero_grad()
        s1.scale(F.cross_entropy(model(x), y)).backward()
        opt.first_step(grad_scaler=s1)
        assert not opt.needs_second_pass
        opt.second_step(grad_scaler=s1)
        sgd.zero_grad()
        s2.scale(F.cross_entropy(reference(x), y)).backward()
        s2.step(sgd)
        s2.update()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters(), strict=True))
    x, y = _batch(seed=5)
    opt.zero_grad()
    s1.scale(F.cross_entropy(model(x), y)).backward()
    opt.first_step(grad_scaler=s1)
    s1.scale(F.cross_entropy(model(x), y)).backward()
    opt.second_step(grad_scaler=s1)
    assert opt.selection and not opt.last_step_skipped
