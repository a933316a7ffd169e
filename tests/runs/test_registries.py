"""Every registry the config, CLI and runners read: each entry works; registering a name makes recipes accept it."""

import dataclasses

import pytest
import torch

from leantrain.config import SECTIONS, RunConfig, resolve
from leantrain.federated.algorithms import ALGORITHMS
from leantrain.finetune.methods import METHODS, method_config_class
from leantrain.marl.learners import LEARNERS
from leantrain.optim.registry import OPTIMIZERS, register_optimizer
from leantrain.runs.kinds import RUN_KINDS, SAME_CONCEPT, kind_of
from leantrain.runs.launch import run
from leantrain.runs.supervised import build_optimizer
from leantrain.train.tasks import ClassificationTask


def _all_keys() -> set[str]:
    keys = {f.name for f in dataclasses.fields(RunConfig)} - set(SECTIONS) - {"model", "finetune"}
    for section, cls in SECTIONS.items():
        keys |= {f"{section}.{f.name}" for f in dataclasses.fields(cls)}
    return keys | set(SECTIONS) | {"model", "finetune"}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_registered_optimizer_builds_from_a_recipe_and_steps(name):
    cfg = resolve(
        {"data": {"dataset": "digits"}, "model": {"name": "mlp"}, "optim": {"name": name, "lr": 0.01, "num_layers": 1}}
    )
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    optimizer = build_optimizer(cfg, model, steps_per_epoch=1)
    batch = {"x": torch.randn(16, 4), "labels": torch.randint(0, 3, (16,))}
    before = [p.detach().clone() for p in model.parameters()]

    def closure():
        optimizer.zero_grad()
        loss = ClassificationTask().loss(model, batch)[0]
        loss.backward()
        return loss

    if getattr(optimizer, "requires_closure", False):
        optimizer.step(closure)
    else:
        closure()
        optimizer.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    getattr(optimizer, "close", lambda: None)()


def test_a_registered_optimizer_is_accepted_by_recipes():
    register_optimizer("plain-sgd-test")(lambda r: torch.optim.SGD(r.params, lr=r.options.lr))
    try:
        cfg = resolve("quickstart", ["optim.name=plain-sgd-test"])
        model = torch.nn.Linear(2, 2)
        assert type(build_optimizer(cfg, model)) is torch.optim.SGD
    finally:
        del OPTIMIZERS["plain-sgd-test"]


@pytest.mark.parametrize("algo", sorted(LEARNERS))
def test_every_registered_marl_learner_trains_from_a_recipe(algo, tmp_path):
    small = ["marl.max_steps=64", "marl.eval_every=32", "marl.test_episodes=2", "marl.batch_episodes=4",
             "marl.n_envs=2", "progress=none", f"output_dir={tmp_path}", "threads=1"]  # fmt: skip
    if algo == "wall":
        small += ["marl.method_options={clean_steps: 16, budget: 1, test_budget: 1, followups: 1, duration: 1}"]
    if algo == "ibal":  # observation masking needs LBF's per-agent blocks; on a matrix game only actions are attacked
        small += ["marl.method_options={mask_observations: false, group_rule: random, budget: 1, test_budget: 1}"]
    if algo == "mappo-br":  # a best response needs partners: a scripted one fits any environment
        small += ["marl.method_options={partners: ['scripted:random']}"]
    summary = run(resolve("qmix-climbing", [f"marl.algo={algo}", *small])).summary
    assert summary["status"] == "completed" and summary["algo"] == algo and summary["updates"] > 0


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_registered_finetune_method_has_a_config_the_recipes_resolve(method):
    cls = method_config_class(method)
    assert (cls is None) == (method == "full")
    assert resolve("quickstart", [f"finetune.method={method}"]).finetune.method == method


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_every_registered_federated_algorithm_is_a_federated_recipe(algorithm):
    cfg = resolve("fedavg-fashion-mnist", [f"federated.algorithm={algorithm}", "federated.options={}"])
    assert kind_of(cfg).name == "federated" and cfg.federated.algorithm == algorithm


@pytest.mark.parametrize("kind", sorted(RUN_KINDS))
def test_every_run_kind_names_real_keys_and_a_runner(kind):
    k = RUN_KINDS[kind]
    assert callable(k.load_runner())
    keys = _all_keys()
    for use in (*k.uses, *k.budget_keys, *([k.selector] if k.selector else [])):
        assert use in keys, use
    for concept in SAME_CONCEPT:
        if kind in concept:
            assert k.uses_key(concept[kind]), concept[kind]
