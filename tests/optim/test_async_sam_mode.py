"""``optim.mode: auto``: two processes when a second core is available, else sequential; the shipped recipe uses it."""

import pytest
import torch
from torch import nn

import leantrain.optim.async_sam as async_sam
from leantrain.config import resolve
from leantrain.errors import ConfigError
from leantrain.optim import Ascent, AsyncSAM
from leantrain.optim.registry import OptimizerRequest, build_optimizer
from leantrain.train import ClassificationTask


def test_available_cores_reads_the_affinity_mask(monkeypatch):
    monkeypatch.setattr(async_sam.os, "sched_getaffinity", lambda pid: {3}, raising=False)
    monkeypatch.setattr(async_sam.os, "cpu_count", lambda: 16)
    assert async_sam.available_cores() == 1  # e.g. taskset -c 3 on a 16-core machine
    monkeypatch.delattr(async_sam.os, "sched_getaffinity", raising=False)
    assert async_sam.available_cores() == 16  # platforms without affinity masks
    monkeypatch.setattr(async_sam.os, "cpu_count", lambda: None)
    assert async_sam.available_cores() == 1


@pytest.mark.parametrize(("cores", "staleness", "expected"), [
    (1, 1, "sequential"), (2, 1, "two_process"), (8, 1, "two_process"), (2, 0, "sequential"), (2, 2, "sequential"),
])  # fmt: skip
def test_resolve_auto(monkeypatch, cores, staleness, expected):
    monkeypatch.setattr(async_sam, "available_cores", lambda: cores)
    assert async_sam.resolve_mode("auto", staleness) == expected
    assert async_sam.resolve_mode("sequential", staleness) == "sequential"  # explicit modes are kept
    assert async_sam.resolve_mode("two_process", staleness) == "two_process"


def test_the_class_takes_resolved_modes_only():
    with pytest.raises(ConfigError, match="resolve 'auto' with resolve_mode"):
        AsyncSAM(nn.Linear(2, 1).parameters(), lr=0.1, mode="auto")


def _rows(n=64):
    x = torch.randn(n, 5, generator=torch.Generator().manual_seed(0))
    return {"x": x, "labels": (x[:, 0] > 0).long()}


@pytest.mark.parametrize("cores", [1, 2])
def test_shipped_recipe_resolves_by_core_count(monkeypatch, cores):
    """The recipe says mode auto; its builder picks the mode from the cores (both branches, the count patched)."""
    cfg = resolve("asyncsam-resnet20-fashion-mnist", [])
    assert cfg.optim.mode == "auto" and cfg.optim.staleness == 1 and cfg.threads == 1
    monkeypatch.setattr(async_sam, "available_cores", lambda: cores)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2))
    ascent = Ascent(ClassificationTask().loss, _rows(), batch_size="auto")  # what runs/supervised.py builds for auto
    opt = build_optimizer(OptimizerRequest(cfg.optim, model, list(model.parameters()), ascent=ascent), "asyncsam")
    try:
        assert isinstance(opt, AsyncSAM)
        if cores == 1:  # one core: sequential, the ascent is the previous descent batch (b' auto needs two)
            assert (opt.mode, opt.ascent, opt._worker) == ("sequential", None, None)
        else:
            assert opt.mode == "two_process" and opt.ascent is ascent and opt._worker is not None
            assert opt._worker.process is None  # started lazily, at the first step
    finally:
        opt.close()


def test_an_explicit_ascent_batch_is_kept_when_auto_falls_back(monkeypatch):
    monkeypatch.setattr(async_sam, "available_cores", lambda: 1)
    cfg = resolve("asyncsam-resnet20-fashion-mnist", ["optim.ascent_batch_size=16"])
    model = nn.Linear(5, 2)
    ascent = Ascent(ClassificationTask().loss, _rows(), batch_size=16)
    opt = build_optimizer(OptimizerRequest(cfg.optim, model, list(model.parameters()), ascent=ascent), "asyncsam")
    assert opt.mode == "sequential" and opt.ascent is ascent  # sequential with its own b'-row ascent batch


def test_recipe_options_reach_the_optimizer(monkeypatch):
    monkeypatch.setattr(async_sam, "available_cores", lambda: 1)
    overrides = ["optim.adaptive=true", "optim.adaptive_form=davda54", "optim.adaptive_eta=0.2", "optim.rho=0.5"]
    cfg = resolve("asyncsam-resnet20-fashion-mnist", overrides)
    model = nn.Linear(5, 2)
    opt = build_optimizer(OptimizerRequest(cfg.optim, model, list(model.parameters())), "asyncsam")
    assert (opt.adaptive_form, opt.adaptive_eta, opt.asam_etas()) == ("davda54", 0.2, [0.0, 0.0])
    with pytest.raises(ConfigError, match="optim.mode"):
        resolve("asyncsam-resnet20-fashion-mnist", ["optim.mode=threads"])
    with pytest.raises(ConfigError, match="adaptive_form"):
        resolve("asyncsam-resnet20-fashion-mnist", ["optim.adaptive_form=samsung"])
