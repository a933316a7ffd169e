"""GPT-FL: the synthetic stand-in, server-side pretraining, FedAvg afterwards, Flower clients, resume."""

import importlib.util

import numpy as np
import pytest
import torch
from fl_fixtures import tiny_data, tiny_model

from leantrain.errors import ConfigError
from leantrain.federated import Simulator, make_algorithm
from leantrain.federated.algorithms import gptfl
from leantrain.federated.algorithms.base import Instruction, communicated
from leantrain.federated.algorithms.gptfl import GPTFL, pretrain_on
from leantrain.federated.simulator import evaluate_state

needs_mnist1d = pytest.mark.skipif(importlib.util.find_spec("mnist1d") is None, reason="mnist1d not installed")
SIM = dict(num_clients=4, clients_per_round=2, rounds=4, local_steps=3, batch_size=8, lr=0.2, seed=5)
PRETRAIN = dict(pretrain_epochs=3, pretrain_lr=0.1, pretrain_batch_size=16)


def _synthetic():
    """Tiny "synthetic" rows: another draw of the tiny task (same labelling rule, other inputs)."""
    data = tiny_data(num_clients=4, per_client=40, seed=0)
    g = torch.Generator().manual_seed(99)
    return {"x": data.train["x"] + 0.3 * torch.randn(data.train["x"].shape, generator=g),
            "labels": data.train["labels"]}  # fmt: skip


def _counting(monkeypatch):
    calls = []
    real = gptfl.pretrain_on

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(gptfl, "pretrain_on", counted)
    return calls


def _corr(a, b):
    a, b = a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True)
    return (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))


@needs_mnist1d
def test_synthetic_generator_is_cleaner_than_the_real_one_and_deterministic():
    from leantrain.data import sources

    shift = {k: v for k, v in sources.MNIST1D_SYNTHETIC.items() if k not in ("num_samples", "seed")}
    assert shift["corr_noise_scale"] < 0.25 and shift["shear_scale"] < 0.75  # below mnist1d's defaults
    # same seed: the same draws, so each row can be compared with its noise-free, shear-free version
    real = sources.make_mnist1d(num_samples=200, seed=5)
    synthetic = sources.make_mnist1d(num_samples=200, seed=5, **shift)
    clean = sources.make_mnist1d(num_samples=200, seed=5, corr_noise_scale=0.0, iid_noise_scale=0.0, shear_scale=0.0)
    assert np.array_equal(real["y"], synthetic["y"])
    closer = _corr(synthetic["x"], clean["x"]) > _corr(real["x"], clean["x"])
    assert closer.mean() > 0.95
    assert np.array_equal(sources.make_mnist1d(num_samples=200, seed=5, **shift)["x"], synthetic["x"])
    assert not np.array_equal(sources.make_mnist1d(num_samples=200, seed=6, **shift)["x"], synthetic["x"])
    with pytest.raises(Exception, match="no generator argument"):
        sources.make_mnist1d(noise=1.0)


@needs_mnist1d
def test_registered_synthetic_set_is_three_times_the_real_training_set():
    from leantrain.data import load_dataset

    real, synthetic = load_dataset("mnist1d"), load_dataset("mnist1d-synthetic")
    assert synthetic.input_shape == real.input_shape and synthetic.classes == real.classes
    assert len(synthetic.train) == 3 * len(real.train)
    assert not np.array_equal(synthetic.test.x[:50], real.test.x[:50])


@needs_mnist1d
def test_pretraining_on_synthetic_rows_beats_chance_on_real_test_rows():
    from leantrain.data import load_dataset
    from leantrain.models import build_model

    real = load_dataset("mnist1d")
    test = {"x": torch.as_tensor(real.test.x), "labels": torch.as_tensor(real.test.y)}
    torch.manual_seed(0)
    model = build_model("mlp", input_shape=(40,), num_classes=10, hidden_sizes=(64,))
    before = evaluate_state(model, model.state_dict(), test)
    rng_before = torch.get_rng_state()
    metrics = pretrain_on(model, "mnist1d-synthetic", epochs=3, lr=0.05, batch_size=64, subset=3000)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the run's global RNG stream is untouched
    after = evaluate_state(model, model.state_dict(), test)
    assert metrics["rows"] == 3000 and metrics["heldout_accuracy"] > 0.5
    assert after["loss"] < before["loss"] and after["accuracy"] > 0.3 > before["accuracy"]  # chance is 0.1


def test_rounds_after_pretraining_are_fedavg_from_the_pretrained_weights():
    data, synthetic = tiny_data(), _synthetic()
    algorithm = GPTFL(synthetic, **PRETRAIN)
    ours = Simulator(algorithm, tiny_model, data, **SIM)
    history = ours.run()
    assert algorithm.pretrained and algorithm.pretrain_metrics["rows"] == len(synthetic["labels"])

    def pretrained_model():
        model = tiny_model()  # built under torch.manual_seed(seed), as every simulator builds its model
        pretrain_on(model, synthetic, epochs=3, lr=0.1, batch_size=16, seed=SIM["seed"])
        return model

    fedavg = Simulator(make_algorithm("fedavg"), pretrained_model, data, **SIM)
    reference = fedavg.run()
    for k, v in fedavg.algorithm.global_state.items():
        assert torch.equal(algorithm.global_state[k], v), k
    assert ours.ledger.state_dict() == fedavg.ledger.state_dict()  # pretraining costs no client bytes
    for a, b in zip(history.rounds, reference.rounds, strict=True):
        assert (a["test_accuracy"], a["train_loss"]) == (b["test_accuracy"], b["train_loss"])
    scratch = Simulator(make_algorithm("fedavg"), tiny_model, data, **SIM).run()
    assert history.rounds[0]["test_accuracy"] > scratch.rounds[0]["test_accuracy"]


def test_resume_does_not_pretrain_again_and_gives_the_same_history(tmp_path, monkeypatch):
    calls = _counting(monkeypatch)
    data, synthetic = tiny_data(), _synthetic()
    full = Simulator(GPTFL(synthetic, **PRETRAIN), tiny_model, data, **SIM).run()
    assert len(calls) == 1
    first = Simulator(GPTFL(synthetic, **PRETRAIN), tiny_model, data, checkpoint_dir=tmp_path, **SIM)
    first.run(stop_after=2)
    resumed = Simulator(GPTFL(synthetic, **PRETRAIN), tiny_model, data, checkpoint_dir=tmp_path, **SIM)
    history = resumed.run(resume=True)
    assert len(calls) == 2  # the resumed run took the pretrained state from the checkpoint
    assert resumed.algorithm.pretrained and resumed.algorithm.pretrain_metrics == first.algorithm.pretrain_metrics
    keys = ("test_accuracy", "test_loss", "train_loss", "up_bytes", "down_bytes")
    assert [[r[k] for k in keys] for r in history.rounds] == [[r[k] for k in keys] for r in full.rounds]


@needs_mnist1d
def test_flower_clients_never_pretrain_and_the_run_matches_the_simulator(monkeypatch):
    pytest.importorskip("flwr")
    from flwr.supercore.task_identity import TaskIdentity
    from test_flower import _config, _flower_run

    calls = _counting(monkeypatch)
    monkeypatch.setattr(TaskIdentity, "_run_id", 7)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    options = {"pretrain_epochs": 1, "pretrain_lr": 0.1, "pretrain_batch_size": 32}
    config = _config(algorithm="gptfl", dataset="mnist1d", train_subset=400, rounds=2, algorithm_options=options)
    strategy, grid, _ = _flower_run(config)
    assert len(calls) == 1  # the server, once; four ClientApps trained without touching the synthetic data
    assert all(row["responded"] == config.clients_per_round for row in strategy.rounds)
    sim = config.simulator()
    history = sim.run()
    for k, v in sim.algorithm.global_state.items():
        assert torch.equal(strategy.algorithm.global_state[k], v), k
    assert [r["test_accuracy"] for r in strategy.rounds] == [r["test_accuracy"] for r in history.rounds]
    # Flower's evaluation before round 1 already sees the pretrained model
    assert strategy.initial_eval["accuracy"] > 1 / len(config.data().test["labels"].unique()) + 0.1


def test_a_client_never_pretrains(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a client pretrained")

    monkeypatch.setattr(gptfl, "pretrain_on", refuse)
    data, synthetic = tiny_data(), _synthetic()
    runtime = Simulator(make_algorithm("fedavg"), tiny_model, data, **SIM)  # a working model, data and contexts
    client = GPTFL(synthetic, **PRETRAIN)  # what a Flower ClientApp builds for every message: setup, client_update
    client.setup(runtime.model, SIM["num_clients"], runtime.devices)
    down = Instruction(communicated(runtime.model.state_dict()))
    ctx = runtime.client_context(0, 1, runtime.client_batches(0, 1))
    reply = client.client_update(ctx, down)
    assert set(reply.arrays) == set(down.arrays) and not client.pretrained


@pytest.mark.parametrize(
    ("options", "field"),
    [({"pretrain_epochs": 0}, "pretrain_epochs"), ({"pretrain_lr": -1.0}, "pretrain_lr"),
     ({"pretrain_momentum": 1.0}, "pretrain_momentum"), ({"synthetic": 3}, "synthetic"),
     ({"synthetic_subset": 0}, "synthetic_subset")],
)  # fmt: skip
def test_bad_options_name_the_field(options, field):
    with pytest.raises(ConfigError, match=field):
        make_algorithm("gptfl", **options)


def test_a_model_that_cannot_read_the_synthetic_rows_is_a_config_error():
    algorithm = GPTFL({"x": torch.randn(10, 5), "labels": torch.zeros(10, dtype=torch.int64)})
    with pytest.raises(ConfigError, match="cannot read the synthetic rows"):
        Simulator(algorithm, tiny_model, tiny_data(), **SIM).run()


@needs_mnist1d
def test_recipe_runs_reduced(tmp_path):
    from leantrain.config import resolve
    from leantrain.runs.launch import run

    overrides = ["data.train_subset=600", "federated.num_clients=8", "federated.clients_per_round=4",
                 "federated.rounds=2", "federated.local_steps=2", "progress=none", f"output_dir={tmp_path}",
                 "federated.options={pretrain_epochs: 1, synthetic_subset: 1000}", "threads=1"]  # fmt: skip
    summary = run(resolve("gptfl-mnist1d", overrides)).summary
    assert summary["status"] == "completed" and summary["algorithm"] == "gptfl"
    assert 0 < summary["final"]["test_accuracy"] <= 1 and summary["totals"]["up_bytes"] > 0
