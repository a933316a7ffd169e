"""GPT-FL (Zhang et al., "GPT-FL: Generative Pre-trained Model-Assisted Federated Learning", arXiv 2306.02210,
CVPR-W 2025): the server generates labelled synthetic data from the task's label names with generative models,
trains the downstream model centrally on it, and starts standard FL (FedAvg) from those weights. Generation and
pretraining happen once, on the server, before round 0; they cost no client bytes and add no FL hyperparameter:
every round afterwards is exactly FedAvg's.

Departures:

- **No generative model.** Nothing here runs T5/ChatGPT prompts or Stable Diffusion (no weights can be downloaded
  in this environment). The default synthetic set, ``"mnist1d-synthetic"``, is a stand-in that keeps the claim's
  shape: the same procedural MNIST-1D generator the real data comes from, run with shifted settings (less
  correlated and iid noise, less shear, another seed; :data:`leantrain.data.sources.MNIST1D_SYNTHETIC`), so it is
  near the real distribution but not equal to it, as generated images are. It is not generated from label names
  and says nothing about how well a real generative model would do. Users with real synthetic data pass it as
  ``synthetic=`` (a dataset name, a leantrain ``Dataset`` or a dict of ``x``/``labels`` tensors), or call
  :func:`pretrain_on` themselves and start any FL runtime from the result (on Flower: ``initial_arrays``).
- **Pretraining recipe.** The paper trains on 3x the real training size; so does the stand-in (10,800 synthetic
  training rows against MNIST-1D's 3,600). The central loop is leantrain's :func:`~leantrain.federated.client.
  local_sgd` (plain SGD with momentum, constant rate, ``pretrain_epochs`` passes), not the official
  ``training_main.py`` schedule.
- **When it runs.** The server pretrains lazily, on the first ``configure`` (or ``eval_state``) call, because the
  same class also runs on Flower clients, which call ``setup`` but never ``configure``: clients never touch the
  synthetic data. ``pretrain()`` may be called earlier explicitly. The pretrained flag and weights are part of
  ``state_dict()``, so a resumed run does not pretrain again.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import torch
from torch import nn

from leantrain.errors import ConfigError
from leantrain.federated.algorithms.base import Instruction, load_arrays
from leantrain.federated.algorithms.fedavg import FedAvg
from leantrain.federated.client import ClientData, local_sgd
from leantrain.federated.clock import DeviceProfile

DEFAULT_SYNTHETIC = "mnist1d-synthetic"


def synthetic_rows(data: Any, seed: int = 0, subset: int | None = None) -> tuple[dict, dict | None]:
    """(training rows, held-out rows or None) as dicts of ``x``/``labels`` tensors.

    ``data``: a registered dataset name (its train and val splits, split with ``seed``; ``subset`` keeps a
    stratified subset of train), a leantrain ``Dataset``, or a dict with ``x`` and ``labels`` (no held-out rows).
    """
    if isinstance(data, str):
        from leantrain.data import load_dataset

        data = load_dataset(data, seed=seed, train_subset=subset)
    if isinstance(data, dict):
        if not {"x", "labels"} <= set(data):
            raise ConfigError(f"synthetic rows need keys 'x' and 'labels'; got {sorted(data)}")
        return {"x": torch.as_tensor(data["x"]), "labels": torch.as_tensor(data["labels"])}, None
    if getattr(data, "train", None) is None or data.train.y is None:
        raise ConfigError(f"synthetic data {data!r} is not a labelled dataset (a name, a Dataset or x/labels)")

    def rows(split):
        return {"x": torch.as_tensor(split.x), "labels": torch.as_tensor(split.y)}

    held = rows(data.val) if data.val is not None and len(data.val) else None
    return rows(data.train), held


def pretrain_on(model: nn.Module, data: Any, epochs: int = 10, lr: float = 0.05, batch_size: int = 64,
                momentum: float = 0.9, weight_decay: float = 0.0, seed: int = 0,
                subset: int | None = None) -> dict[str, float]:  # fmt: skip
    """Train ``model`` in place on labelled (synthetic) data: GPT-FL's server-side pretraining.

    ``epochs`` passes of SGD over the training rows of ``data`` (see :func:`synthetic_rows`) in batches of
    ``batch_size``, shuffled by a generator seeded with ``seed``; torch's global RNG is left as it was. Returns the
    mean training loss, the rows and steps used and, where ``data`` has held-out rows, their loss and accuracy.
    """
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"pretrain_on {name}={value!r} is invalid; expected an integer >= 1")
    train, held = synthetic_rows(data, seed, subset)
    n = len(train["labels"])
    if n == 0:
        raise ConfigError("pretrain_on got no synthetic training rows")
    _check_inputs(model, train)
    from leantrain.federated.simulator import evaluate_state, seed_torch
    from leantrain.train.tasks import ClassificationTask

    steps = epochs * math.ceil(n / batch_size)  # ClientData yields a short last batch: exactly `epochs` passes
    batches = ClientData(train, [np.arange(n)]).batches(0, batch_size, seed)
    # fork: dropout draws must not shift the run's global RNG stream; enable_grad: a server may pretrain lazily from
    # inside its no_grad evaluation (Flower evaluates before round 1)
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        seed_torch(seed)
        fit = local_sgd(model, ClassificationTask().loss, batches, steps, lr, momentum, weight_decay)
    metrics = {"train_loss": fit["loss"], "rows": n, "steps": steps}
    if held is not None:
        own = {k: v.detach().clone() for k, v in model.state_dict().items()}
        held_out = evaluate_state(model, own, held)
        metrics.update({"heldout_loss": held_out["loss"], "heldout_accuracy": held_out["accuracy"]})
    return metrics


def _check_inputs(model: nn.Module, rows: dict[str, torch.Tensor]) -> None:
    """A model that cannot read the synthetic rows is a configuration error, said once and plainly."""
    training = model.training
    model.eval()  # the probe must not move BatchNorm running statistics
    try:
        with torch.no_grad():
            out = model(rows["x"][:2])
    except (RuntimeError, ValueError) as err:
        raise ConfigError(f"the model cannot read the synthetic rows (inputs {tuple(rows['x'].shape[1:])}): "
                          f"{err}; synthesise data of the real task's input shape") from None  # fmt: skip
    finally:
        model.train(training)
    classes = getattr(out, "logits", out).shape[-1]
    if int(rows["labels"].max()) >= classes:
        raise ConfigError(f"synthetic labels reach {int(rows['labels'].max())} but the model has {classes} outputs")


class GPTFL(FedAvg):
    """FedAvg started from a model the server pretrained on synthetic data (once, before round 0).

    Options: ``synthetic`` (dataset name, ``Dataset`` or x/labels dict; default the MNIST-1D stand-in), and the
    central pretraining's ``pretrain_epochs``, ``pretrain_lr``, ``pretrain_batch_size``, ``pretrain_momentum``,
    ``pretrain_weight_decay``, ``pretrain_seed`` (None: the run's seed) and ``synthetic_subset`` (keep n synthetic
    training rows; None: all). Client side and aggregation are FedAvg's.
    """

    name = "gptfl"

    def __init__(self, synthetic: Any = DEFAULT_SYNTHETIC, pretrain_epochs: int = 10, pretrain_lr: float = 0.05,
                 pretrain_batch_size: int = 64, pretrain_momentum: float = 0.9, pretrain_weight_decay: float = 0.0,
                 pretrain_seed: int | None = None, synthetic_subset: int | None = None,
                 weighting: str = "samples"):  # fmt: skip
        super().__init__(weighting)
        ints = {"pretrain_epochs": (pretrain_epochs, 1), "pretrain_batch_size": (pretrain_batch_size, 1),
                "pretrain_seed": (pretrain_seed, 0), "synthetic_subset": (synthetic_subset, 1)}  # fmt: skip
        for field, (value, low) in ints.items():
            if value is None and field in ("pretrain_seed", "synthetic_subset"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"GPTFL {field}={value!r} is invalid; expected an integer >= {low}")
        if isinstance(pretrain_lr, bool) or not isinstance(pretrain_lr, int | float) or not pretrain_lr > 0:
            raise ConfigError(f"GPTFL pretrain_lr={pretrain_lr!r} is invalid; expected a number > 0")
        if not isinstance(pretrain_momentum, int | float) or not 0 <= pretrain_momentum < 1:
            raise ConfigError(f"GPTFL pretrain_momentum={pretrain_momentum!r} is invalid; expected a number in [0, 1)")
        if not isinstance(pretrain_weight_decay, int | float) or pretrain_weight_decay < 0:
            raise ConfigError(f"GPTFL pretrain_weight_decay={pretrain_weight_decay!r} is invalid; expected >= 0")
        if not isinstance(synthetic, str | dict) and getattr(synthetic, "train", None) is None:
            raise ConfigError(f"GPTFL synthetic={synthetic!r} is invalid; expected a dataset name, a leantrain "
                              "Dataset or a dict with 'x' and 'labels'")  # fmt: skip
        self.synthetic, self.synthetic_subset = synthetic, synthetic_subset
        self.pretrain_options = {"epochs": pretrain_epochs, "lr": float(pretrain_lr),
                                 "batch_size": pretrain_batch_size, "momentum": float(pretrain_momentum),
                                 "weight_decay": float(pretrain_weight_decay)}  # fmt: skip
        self.pretrain_seed = pretrain_seed
        self.pretrained = False
        self.pretrain_metrics: dict[str, float] = {}

    def setup(self, model: nn.Module, num_clients: int, devices: list[DeviceProfile]) -> None:
        super().setup(model, num_clients, devices)
        self._architecture = model  # copied when the server pretrains; clients never do
        self.pretrained = False
        self.pretrain_metrics = {}

    def pretrain(self) -> dict[str, float]:
        """Pretrain the global model on the synthetic data (server side; only the first call trains)."""
        if self.pretrained:
            return self.pretrain_metrics
        if not hasattr(self, "_architecture"):
            raise ConfigError("GPTFL.pretrain() needs setup(model, ...) first")
        model = copy.deepcopy(self._architecture)
        load_arrays(model, self.global_state)
        seed = self.pretrain_seed if self.pretrain_seed is not None else int(getattr(self, "seed", 0))
        self.pretrain_metrics = pretrain_on(model, self.synthetic, seed=seed, subset=self.synthetic_subset,
                                            **self.pretrain_options)  # fmt: skip
        self.global_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.pretrained = True
        return self.pretrain_metrics

    def configure(self, round_idx: int, cohort: list[int]) -> dict[int, Instruction]:
        self.pretrain()  # server side only: Flower clients never call configure
        return super().configure(round_idx, cohort)

    def eval_state(self) -> dict[str, torch.Tensor]:
        self.pretrain()  # Flower evaluates before round 1: the model FL starts from is the pretrained one
        return super().eval_state()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "pretrained": self.pretrained, "pretrain_metrics": dict(self.pretrain_metrics)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.pretrained = bool(state.get("pretrained", False))
        self.pretrain_metrics = dict(state.get("pretrain_metrics", {}))
