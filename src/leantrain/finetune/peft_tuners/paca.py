"""PaCA (Partial Connection Adaptation, arXiv 2503.01905) as an out-of-tree Hugging Face PEFT tuner.

Each targeted ``nn.Linear`` trains ``r`` random input columns through a zero-initialised ``paca_delta`` (out x r);
``paca_indices`` (sorted int64, a persistent buffer) records which columns, and is written to the adapter
safetensors, so ``PeftModel.from_pretrained`` restores the exact columns from the file, not from the RNG. The math
(one GEMM per forward/backward, only x[..., S] saved) lives in :mod:`leantrain.finetune.paca`; this module adapts it
to PEFT's config / layer / model layout, mirroring the PaCA tuner of the unmerged upstream PEFT port so that the
configs stay compatible if it lands. Import this module before ``PeftModel.from_pretrained`` on a PaCA adapter.

QPaCA (``PacaConfig(quantize="int8")``): each targeted layer's frozen weight becomes the core's
:class:`~leantrain.finetune.paca.Int8WeightOnly` (``paca_int8``: int8 rows + fp32 scales, the ``r`` selected columns
kept in full precision) and the dense ``base_layer.weight`` is released (set to ``None``). The adapter file stores
``paca_int8.keep_columns`` and ``paca_int8.kept`` (the original columns) but not the int8 weight or scales: those
are re-quantized from the fresh base weight at load time, which is deterministic, so a reload is exact.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from peft.config import PeftConfig
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_adapters_to_merge
from peft.utils.error import NoMatchingPeftModuleError
from torch import nn

from leantrain.errors import ConfigError
from leantrain.finetune.paca import (
    Int8WeightOnly,
    _delta_dtype,
    paca_linear,
    select_paca_indices,
    validate_paca_args,
)
from leantrain.finetune.peft_tuners.registration import add_peft_type, register_tuner
from leantrain.finetune.target_modules import default_target_mapping

__all__ = ["PacaConfig", "PacaLayer", "PacaPeftLinear", "PacaModel"]


# --------------------------------------------------------------------------------------------------------------------
# Config


@dataclass
class PacaConfig(PeftConfig):
    """Configuration of a :class:`PacaModel` (defaults: the official README example, r=8, paca_alpha=16)."""

    r: int = field(
        default=8, metadata={"help": "Number of input columns trained per targeted Linear (1..in_features)."}
    )
    paca_alpha: float = field(
        default=16.0,
        metadata={"help": "Scale numerator: the column update is (paca_alpha / r) * paca_delta. Must be > 0."},
    )
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Names (suffix match) or a regex of the nn.Linear modules to adapt, e.g. ['query', 'value'], or "
            "'all-linear' (the paper's README example). None uses LoRA's per-architecture default from PEFT's table "
            "(bert: query/value; llama: q_proj/v_proj), the same as GemConfig."
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Names or a regex of modules never to adapt."}
    )
    random_seed: int | None = field(
        default=None,
        metadata={
            "help": "Seed for the column draw; each layer uses (random_seed + crc32(module name)) mod 2**63. "
            "None draws from the global torch RNG (as the official code does). Saved indices always win at load time."
        },
    )
    bias: Literal["none", "all", "paca_only"] = field(
        default="none", metadata={"help": "Which biases to train: 'none', 'all', or 'paca_only' (targeted layers)."}
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Extra modules (e.g. a new classifier head) trained in full and saved."}
    )
    init_weights: bool = field(
        default=True,
        metadata={"help": "Zero-initialise paca_delta (identity adapter). False draws random values (tests only)."},
    )
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "Only adapt these layer indices (as in LoRA); None adapts all."}
    )
    layers_pattern: list[str] | str | None = field(
        default=None, metadata={"help": "Name of the layer list used with layers_to_transform, e.g. 'layer'."}
    )
    quantize: Literal["int8"] | None = field(
        default=None,
        metadata={
            "help": "QPaCA: 'int8' stores each targeted layer's frozen weight as per-output-row symmetric int8 + fp32 "
            "scales (the r trained columns kept in full precision) and releases the dense weight; None keeps it "
            "dense. The int8 weight is not saved: it is re-quantized from the base weight at load time."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = add_peft_type("paca")
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"PacaConfig.r={self.r!r}; accepted: an int >= 1 (and <= each layer's in_features)")
        if not isinstance(self.paca_alpha, (int, float)) or not self.paca_alpha > 0:
            raise ConfigError(f"PacaConfig.paca_alpha={self.paca_alpha!r}; accepted: a number > 0")
        if self.bias not in ("none", "all", "paca_only"):
            raise ConfigError(f"PacaConfig.bias={self.bias!r}; accepted: 'none', 'all', 'paca_only'")
        if self.random_seed is not None and not isinstance(self.random_seed, int):
            raise ConfigError(f"PacaConfig.random_seed={self.random_seed!r}; accepted: an int or None")
        if self.quantize not in (None, "int8"):
            raise ConfigError(f"PacaConfig.quantize={self.quantize!r}; accepted: None or 'int8'")


# --------------------------------------------------------------------------------------------------------------------
# Layer


class PacaLayer(BaseTunerLayer):
    """PEFT tuner-layer mixin (like PEFT's ``LoraLayer``): per-adapter ``paca_delta`` (trainable), ``paca_indices``.

    With ``quantize="int8"`` the layer also owns ``paca_int8`` (the quantized frozen weight, shared by the layer, not
    keyed by adapter) and ``base_layer.weight`` is ``None`` except while an adapter is merged.
    """

    adapter_layer_names = ("paca_delta",)
    other_param_names = ("paca_indices", "paca_r", "paca_alpha", "paca_scaling")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.paca_delta = nn.ParameterDict({})
        self.paca_indices = BufferDict({}, persistent=True)
        self.paca_int8: Int8WeightOnly | None = None
        self.paca_r: dict[str, int] = {}
        self.paca_alpha: dict[str, float] = {}
        self.paca_scaling: dict[str, float] = {}
        # original columns captured at merge time, so unmerge restores the base weight bit-exactly
        self._paca_merged_columns: dict[str, torch.Tensor] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        base = self.get_base_layer()
        self.in_features, self.out_features = base.in_features, base.out_features

    def _check_quantize(self, adapter_name: str, config: PacaConfig) -> None:
        if self.paca_int8 is not None or (config.quantize is not None and len(self.paca_delta)):
            raise ConfigError(
                f"PacaConfig.quantize={config.quantize!r} for adapter {adapter_name!r}: a QPaCA (quantize='int8') "
                "layer holds exactly one adapter, because the dense weight needed to keep a second adapter's columns "
                "in full precision has been released. Use one adapter, or quantize=None for all adapters."
            )

    def update_layer(self, adapter_name: str, config: PacaConfig, module_name: str = "") -> None:
        base = self.get_base_layer()
        validate_paca_args(base, config.r, config.paca_alpha, module_name)
        self._check_quantize(adapter_name, config)
        weight = base.weight
        indices = select_paca_indices(self.in_features, config.r, seed=config.random_seed, name=module_name)
        self.paca_indices[adapter_name] = indices.to(weight.device)
        dtype = _delta_dtype(weight.dtype)
        delta = torch.zeros(self.out_features, config.r, dtype=dtype, device=weight.device)
        if not config.init_weights:
            delta.normal_(0.0, 0.02)
        self.paca_delta[adapter_name] = nn.Parameter(delta)
        self.paca_r[adapter_name] = config.r
        self.paca_alpha[adapter_name] = float(config.paca_alpha)
        self.paca_scaling[adapter_name] = float(config.paca_alpha) / config.r
        self._move_adapter_to_device_of_base_layer(adapter_name)
        if config.quantize == "int8":  # PacaModel releases the dense weight once the layer is in place
            self.paca_int8 = Int8WeightOnly(weight, self.paca_indices[adapter_name].clone(), save_quantized=False)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _release_dense_weight(self) -> None:
        """QPaCA: drop the dense base weight; only int8 + scales + the kept columns remain."""
        if self.paca_int8 is not None:
            self.get_base_layer().weight = None

    def _frozen_weight(self) -> torch.Tensor | Int8WeightOnly:
        """What the GEMM uses as W: the dense base weight, or the int8 one when quantized and not merged."""
        weight = self.get_base_layer().weight
        return weight if weight is not None else self.paca_int8

    def _frozen_dtype(self) -> torch.dtype:
        return self.paca_int8.dtype if self.paca_int8 is not None else self.get_base_layer().weight.dtype


class PacaPeftLinear(nn.Module, PacaLayer):
    """The PEFT tuner layer PaCA puts in place of a ``torch.nn.Linear`` (several adapters, merge, QPaCA).

    Not to be confused with :class:`leantrain.finetune.paca.PacaLinear`, the plain-PyTorch wrapper without PEFT.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: PacaConfig, module_name: str = "") -> None:
        super().__init__()
        PacaLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, module_name)

    def _scaled(self, adapter: str, dtype: torch.dtype) -> torch.Tensor:
        return (self.paca_scaling[adapter] * self.paca_delta[adapter]).to(dtype)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Dense (out, in) update: ``scaling * paca_delta`` in the columns ``paca_indices``, zero elsewhere."""
        idx, dtype = self.paca_indices[adapter_name], self._frozen_dtype()
        delta = torch.zeros(self.out_features, self.in_features, dtype=dtype, device=idx.device)
        return delta.index_copy(1, idx, self._scaled(adapter_name, dtype))

    @torch.no_grad()
    def _materialize(self) -> None:
        """QPaCA: give the base layer a dense weight = dequantized int8 with the kept original columns."""
        base = self.get_base_layer()
        if base.weight is None:
            base.weight = nn.Parameter(self.paca_int8.dequantize(), requires_grad=False)

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if self.paca_int8 is not None and adapter_names:
            self._materialize()  # merging needs a dense weight; unmerge releases it again
        weight = self.get_base_layer().weight
        for name in adapter_names:
            if name not in self.paca_delta:
                continue
            idx = self.paca_indices[name]
            columns = weight.index_select(1, idx)  # (out, r) before this adapter
            new = columns + self._scaled(name, weight.dtype)
            if safe_merge and not torch.isfinite(new).all():
                raise ValueError(f"NaNs or infs in the merged weights; the adapter {name!r} seems to be broken")
            weight.index_copy_(1, idx, new)
            self._paca_merged_columns[name] = columns
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        if self.paca_int8 is not None:  # the int8 weight was never touched: drop the dense copy
            self.merged_adapters.clear()
            self._paca_merged_columns.clear()
            self._release_dense_weight()
            return
        weight = self.get_base_layer().weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name not in self.paca_delta:
                continue
            original = self._paca_merged_columns.pop(name, None)
            idx = self.paca_indices[name]
            if original is None:  # merged state loaded from elsewhere: best-effort inverse
                original = weight.index_select(1, idx) - self._scaled(name, weight.dtype)
            weight.index_copy_(1, idx, original)

    def unload_and_optionally_merge_module(
        self, merge: bool, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        """Called by ``merge_and_unload`` / ``unload``: the base ``nn.Linear``, with a dense weight under QPaCA."""
        if merge:
            self.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        if self.paca_int8 is not None:
            self._materialize()  # unload() without merge gives the quantized base, dequantized
        return self.get_base_layer()

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return True

    def _base_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        weight = self._frozen_weight()
        if isinstance(weight, torch.Tensor):
            return self.base_layer(x, *args, **kwargs)
        return paca_linear(self._cast_input_dtype(x, weight.dtype), weight, self.get_base_layer().bias, ())

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self._base_forward(x, *args, **kwargs)
        active = [a for a in self.active_adapters if a in self.paca_delta]
        if self.merged or not active:
            return self._base_forward(x, *args, **kwargs)
        base = self.get_base_layer()
        if any((base._forward_hooks, base._forward_pre_hooks, base._backward_hooks, base._backward_pre_hooks)):
            warnings.warn(
                "PaCA calls its own GEMM, so hooks on the wrapped base layer are bypassed; hook the PaCA layer",
                stacklevel=2,
            )
        x = self._cast_input_dtype(x, self._frozen_dtype())
        adapters = [(self.paca_indices[a], self.paca_scaling[a], self.paca_delta[a]) for a in active]
        return paca_linear(x, self._frozen_weight(), base.bias, adapters)

    @torch.no_grad()
    def to_lora(self, adapter_name: str = "default") -> tuple[torch.Tensor, torch.Tensor, float]:
        """Exact rank-r LoRA factors ``(A one-hot (r, in), B = scaling * delta (out, r), 1.0)``; see PacaLinear.

        Under QPaCA they are exact relative to the quantized base (the dequantized weight), not the fp32 one.
        """
        r, idx = self.paca_r[adapter_name], self.paca_indices[adapter_name]
        delta = self.paca_delta[adapter_name]
        a = torch.zeros(r, self.in_features, dtype=delta.dtype, device=delta.device)
        a[torch.arange(r, device=a.device), idx] = 1.0
        return a, (self.paca_scaling[adapter_name] * delta).clone(), 1.0

    def __repr__(self) -> str:
        return "paca." + super().__repr__()


# --------------------------------------------------------------------------------------------------------------------
# Model


class PacaModel(BaseTuner):
    """Wrap every targeted ``nn.Linear`` of ``model`` in a :class:`PacaPeftLinear` (use via ``get_peft_model``).

    Example::

        import leantrain.finetune.peft_tuners.paca  # registers PeftType.PACA
        from peft import get_peft_model
        model = get_peft_model(base, PacaConfig(r=8, paca_alpha=16, target_modules=["query", "value"]))
    """

    prefix: str = "paca_"
    tuner_layer_cls = PacaLayer
    target_module_mapping = default_target_mapping()  # LoRA's defaults, shared with GEM (finetune.target_modules)

    def _prepare_adapter_config(self, peft_config: PacaConfig, model_config: dict) -> PacaConfig:
        if peft_config.target_modules is None and model_config.get("model_type") not in self.target_module_mapping:
            raise ConfigError(
                f"PacaConfig.target_modules=None, and there is no default for model_type "
                f"{model_config.get('model_type')!r}; pass target_modules (names, a regex, or 'all-linear')"
            )
        return super()._prepare_adapter_config(peft_config, model_config)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        except NoMatchingPeftModuleError as err:
            linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
            leaves = sorted({n.rsplit(".", 1)[-1] for n in linear})
            shown = ", ".join(linear[:30]) + (f", ... ({len(linear)} in all)" if len(linear) > 30 else "")
            raise ConfigError(
                f"PacaConfig.target_modules={self.peft_config[adapter_name].target_modules!r} matched no module. "
                f"Linear layer names (suffixes): {leaves}; full names: {shown}"
            ) from err

    @staticmethod
    def _create_new_module(config: PacaConfig, adapter_name: str, target: nn.Module, module_name: str = ""):
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not isinstance(base, nn.Linear):
            raise ConfigError(
                f"PaCA supports nn.Linear only; target {module_name!r} is {type(base).__name__}. "
                "Remove it from PacaConfig.target_modules."
            )
        return PacaPeftLinear(target, adapter_name, config, module_name)

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs) -> None:
        if isinstance(target, PacaPeftLinear):
            target.update_layer(adapter_name, config, current_key)
            return
        new_module = self._create_new_module(config, adapter_name, target, current_key)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added (non-active) adapter is not trainable
        self._replace_module(parent, target_name, new_module, target)  # reads target.weight: release after it
        new_module._release_dense_weight()


register_tuner("paca", PacaConfig, PacaModel, prefix="paca_")
