"""GEM (arXiv 2508.16191) as a Hugging Face PEFT tuner: sparse trainable deltas at GEM-selected weight entries.

GEM's masks come from a gradient pass over data (:func:`leantrain.finetune.gem.compute_gem_masks`), which does not
fit PEFT's data-free ``get_peft_model``. :func:`apply_gem` therefore computes the masks first, writes the per-layer
counts into ``GemConfig.layer_budgets`` (JSON, so ``PeftModel.from_pretrained`` can rebuild every buffer shape from
the config alone) and hands the indices to the layers through a non-field config attribute, never saved as JSON.
Each wrapped Linear keeps ``gem_indices`` (int32 flat positions, a persistent buffer saved in the adapter file) and
trains ``gem_values`` (one fp32 scalar per position); the forward adds them into W out of place, like PEFT's
Super-Tuning. Import this module before ``PeftModel.from_pretrained`` so that the ``GEM`` peft type exists.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from leantrain.errors import ConfigError, MissingDependencyError

try:
    from peft import PeftModel, get_peft_model
    from peft.config import PeftConfig
    from peft.tuners._buffer_dict import BufferDict
    from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_adapters_to_merge
except ImportError:
    raise MissingDependencyError("peft", 'pip install "leantrain[peft]" (peft 0.21.x)') from None
from leantrain.finetune.gem import (
    GemMaskConfig,
    LossFn,
    compute_gem_masks,
    find_target_linears,
    init_values,
    scatter_delta,
)
from leantrain.finetune.peft_tuners.registration import add_peft_type, register_tuner


@dataclass
class GemConfig(PeftConfig, GemMaskConfig):
    """PEFT config of GEM: the mask settings of :class:`~leantrain.finetune.gem.GemMaskConfig` plus the counts.

    Build the adapter with :func:`apply_gem`, which fills ``layer_budgets``; ``get_peft_model`` with an empty
    ``layer_budgets`` is refused because the masks need a gradient pass.
    """

    layer_budgets: dict[str, int] = field(
        default_factory=dict,
        metadata={
            "help": (
                "Trainable entries per target layer (full module name -> count), filled by apply_gem; stored so "
                "that from_pretrained can rebuild the index and value shapes. Layers with 0 are not wrapped."
            )
        },
    )

    modules_to_save: list[str] | None = field(
        default=None,
        metadata={
            "help": (
                "Modules outside the GEM layers to train fully and save, e.g. ['classifier'] for a freshly "
                "initialised head. The paper trains none (its budget counts only the masked entries). Before "
                "scoring they are warmed up alone for head_warmup_steps steps (ours)."
            )
        },
    )

    def __post_init__(self) -> None:
        PeftConfig.__post_init__(self)
        self.validate_gem()
        self.peft_type = add_peft_type("gem")
        bad = {k: v for k, v in self.layer_budgets.items() if not isinstance(v, int) or v < 0}
        if bad:
            raise ConfigError(f"GemConfig.layer_budgets has invalid counts {bad}; accepted: integers >= 0")


class GemLayer(BaseTunerLayer):
    """Per-adapter sparse delta on a frozen Linear: ``gem_values[a]`` added at flat positions ``gem_indices[a]``."""

    adapter_layer_names = ("gem_values",)
    other_param_names = ("gem_indices",)

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.gem_values = nn.ParameterDict({})
        self.gem_indices = BufferDict(persistent=True)
        self._disable_adapters = False
        self.merged_adapters = []
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features

    def update_layer(self, adapter_name: str, config: GemConfig, count: int, indices: torch.Tensor | None) -> None:
        """Allocate ``count`` entries; ``indices`` is None when loading (the checkpoint fills both tensors)."""
        weight = self.get_base_layer().weight
        if indices is None:
            indices = torch.zeros(count, dtype=torch.int32)
        elif indices.numel() != count:
            raise ConfigError(f"GEM: {indices.numel()} indices for a layer budget of {count}")
        indices = indices.to(device=weight.device, dtype=torch.int32)
        self.gem_indices[adapter_name] = indices
        self.gem_values[adapter_name] = nn.Parameter(init_values(weight, indices, config.init))
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)


class GemPeftLinear(nn.Module, GemLayer):
    """GEM's PEFT tuner layer on a ``torch.nn.Linear`` (multi-adapter; the PEFT-free wrapper is
    :class:`leantrain.finetune.gem.GemSparseDeltaLinear`)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: GemConfig, **kwargs: Any) -> None:
        super().__init__()
        GemLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, **kwargs)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Dense (out, in) delta of one adapter, zero outside its mask."""
        weight = self.get_base_layer().weight
        return scatter_delta(torch.zeros_like(weight), self.gem_indices[adapter_name], self.gem_values[adapter_name])

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add each adapter's values into the base weight in place."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        weight = self.get_base_layer().weight
        for name in adapter_names:
            if name not in self.gem_values:
                continue
            merged = scatter_delta(weight.data, self.gem_indices[name], self.gem_values[name].detach())
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"NaNs detected in the merged weights; the GEM adapter {name!r} seems broken")
            weight.data = merged
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtract merged adapters from the base weight again."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        weight = self.get_base_layer().weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.gem_values:
                weight.data = scatter_delta(weight.data, self.gem_indices[name], -self.gem_values[name].detach())

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        active = [a for a in self.active_adapters if a in self.gem_values]
        if self.merged or not active:
            return self.base_layer(x, *args, **kwargs)
        base = self.get_base_layer()
        weight = base.weight  # (out, in), frozen
        for name in active:
            weight = scatter_delta(weight, self.gem_indices[name], self.gem_values[name])
        return nn.functional.linear(x, weight, base.bias)

    def __repr__(self) -> str:
        return "gem." + super().__repr__()


class GemModel(BaseTuner):
    """PEFT tuner of GEM; each Linear named in ``GemConfig.layer_budgets`` with a count > 0 becomes a GemPeftLinear."""

    prefix: str = "gem_"
    tuner_layer_cls = GemLayer
    target_module_mapping: dict[str, list[str]] = {}

    def _prepare_adapter_config(self, peft_config: GemConfig, model_config: dict) -> GemConfig:
        if not peft_config.layer_budgets:
            raise ConfigError(
                "GemConfig.layer_budgets is empty: GEM masks need a gradient pass over data; build the model with "
                "leantrain.finetune.apply_gem(model, dataloader, config) instead of get_peft_model"
            )
        if peft_config.target_modules is None:
            peft_config.target_modules = sorted(peft_config.layer_budgets)
        return peft_config

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        count = config.layer_budgets.get(current_key, 0)
        if count == 0:
            return  # matched by name but given no budget (or skipped for a non-finite score)
        indices = getattr(config, "_gem_indices", {}).get(current_key)
        if isinstance(target, GemLayer):
            target.update_layer(adapter_name, config, count=count, indices=indices)
            return
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not isinstance(base, nn.Linear):
            raise ConfigError(f"GEM supports nn.Linear targets only; {current_key!r} is {type(base).__name__}")
        new_module = GemPeftLinear(target, adapter_name, config, count=count, indices=indices)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an additional adapter is not trainable until activated
        self._replace_module(parent, target_name, new_module, target)


def apply_gem(
    model: nn.Module,
    dataloader: Iterable[dict[str, torch.Tensor]],
    config: GemConfig | None = None,
    loss_fn: LossFn | None = None,
    adapter_name: str = "default",
) -> PeftModel:
    """Compute GEM masks on ``dataloader`` and wrap ``model`` as a PEFT model training only those entries.

    With ``modules_to_save`` and ``head_warmup_steps > 0`` those modules are first trained alone on ``dataloader``
    (see :mod:`leantrain.finetune.gem_head_warmup`) and enter the adapter warmed up. The returned config
    (``peft_model.peft_config[adapter_name]``) holds the resolved ``target_modules`` (the full names of the scored
    layers) and ``layer_budgets``; the mask result, with the scoring pass's gradients, is attached as
    ``peft_model.gem_masks`` (:func:`leantrain.finetune.gem_analysis.mask_statistics` reads it).
    """
    config = config if config is not None else GemConfig()
    find_target_linears(model, config.target_modules)  # clear error listing the Linear names before the pass
    masks = compute_gem_masks(model, dataloader, config, loss_fn=loss_fn)
    config = dataclasses.replace(config, target_modules=sorted(masks.counts), layer_budgets=dict(masks.counts))
    config._gem_indices = masks.indices  # not a dataclass field: never written to adapter_config.json
    peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    del config._gem_indices
    peft_model.gem_masks = masks
    return peft_model


register_tuner("gem", GemConfig, GemModel, prefix="gem_")
