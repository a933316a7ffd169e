"""The prune: config section through `leantrain run`, and VAR as a loop gradient transform."""

import pytest
import torch
from torch import nn

from leantrain.config import resolve
from leantrain.errors import ConfigError
from leantrain.prune import VarianceAmplifyingRegularizer
from leantrain.prune.recipe import pruned_metrics, var_transforms
from leantrain.runs.launch import run

BASE = {
    "name": "var-digits", "threads": 1, "progress": "none",
    "data": {"dataset": "digits", "batch_size": 64},
    "model": {"name": "mlp", "hidden_sizes": [32]},
    "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
    "train": {"epochs": 3},
    "prune": {"var_lam": 1e-4, "eval_sparsities": [0.5, 0.9]},
}  # fmt: skip


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def test_the_gradient_transform_adds_the_penalty_gradient_autograd_gives():
    x, y = torch.randn(4, 5), torch.tensor([0, 1, 2, 1])
    a, b = _mlp(), _mlp()
    (transform,) = var_transforms(resolve(BASE).prune, a)
    nn.functional.cross_entropy(a(x), y).backward()
    transform(a)
    penalty = VarianceAmplifyingRegularizer(b, lam=1e-4)
    (nn.functional.cross_entropy(b(x), y) + penalty()).backward()
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    assert var_transforms(resolve(BASE, ["prune.var_lam=0"]).prune, a) == []


def test_pruned_metrics_prune_a_copy_at_each_sparsity():
    model = _mlp()
    seen = []

    def evaluate(m):
        weights = [mod.weight for mod in m if isinstance(mod, nn.Linear)]
        zeros = sum(int((w == 0).sum()) for w in weights)
        seen.append(zeros / sum(w.numel() for w in weights))
        return {"test_accuracy": 1.0}

    out = pruned_metrics(model, [0.5, 0.8], "global", evaluate)
    assert list(out) == ["0.5", "0.8"] and seen == [28 / 56, round(0.8 * 56) / 56]
    assert all((mod.weight != 0).all() for mod in model if isinstance(mod, nn.Linear))  # the model itself untouched


def test_var_run_reports_pruned_accuracy_and_differs_from_plain(tmp_path):
    var = run(resolve(BASE, [f"output_dir={tmp_path}"])).summary
    plain = run(resolve(BASE, [f"output_dir={tmp_path}", "prune.var_lam=0"])).summary
    assert set(var["pruned"]) == {"0.5", "0.9"}
    assert all(0 <= m["test_accuracy"] <= 1 for m in var["pruned"].values())
    assert var["final"]["test_loss"] != plain["final"]["test_loss"]
    assert var["final"]["test_accuracy"] > 0.8


@pytest.mark.parametrize(
    "override, message",
    [("prune.eval_sparsities=[0.5,1.0]", r"\[0, 1\)"), ("prune.var_lam=-1", "var_lam"),
     ("prune.prune_scope=block", "prune_scope")],
)  # fmt: skip
def test_bad_prune_config_is_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        resolve(BASE, [override])
