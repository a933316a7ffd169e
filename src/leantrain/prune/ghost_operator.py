"""The Ghosted Layers operator (arXiv 2605.15491) as a module on a decoder block, and its placement hooks.

A gap left by removed blocks gets one linear operator h ← h · W*, held by the block after the gap (applied to its
input, ``"pre"``) or, for a gap at the very end, by the last surviving block (applied to its output, ``"post"``).
Fitting W* is :mod:`leantrain.prune.ghosted`; this module is only the carrier, shared by the fit and by the ghosted
Hugging Face model classes (:mod:`leantrain.prune.ghosted_models`) that rebuild the operators when a saved model
loads.
"""

from __future__ import annotations

import torch
from torch import nn

from leantrain.errors import ConfigError
from leantrain.prune.depth import decoder_layers


class GhostOperator(nn.Module):
    """h -> h @ W for hidden states (..., C); holds ``linear.weight`` = Wᵀ in float32."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size, bias=False, dtype=torch.float32)
        with torch.no_grad():
            self.linear.weight.copy_(torch.eye(hidden_size))

    def set_operator(self, w: torch.Tensor) -> GhostOperator:
        with torch.no_grad():
            self.linear.weight.copy_(w.T.to(torch.float32))
        return self

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.linear(h.to(torch.float32)).to(h.dtype)


def _pre_hook(layer: nn.Module, args: tuple, kwargs: dict):
    if args:
        return (layer.ghost_pre(args[0]), *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": layer.ghost_pre(kwargs["hidden_states"])}


def _post_hook(layer: nn.Module, _args, output):
    if isinstance(output, tuple):
        return (layer.ghost_post(output[0]), *output[1:])
    return layer.ghost_post(output)


def attach_ghosts(model: nn.Module, placement: dict[str, str]) -> None:
    """Give the blocks named in ``placement`` ({block index: "pre" | "post"}) identity operators and hooks."""
    layers = decoder_layers(model)
    hidden = model.config.hidden_size
    for key, where in placement.items():
        layer = layers[int(key)]
        if where not in ("pre", "post"):
            raise ConfigError(f"ghost placement {where!r} for layer {key} must be 'pre' or 'post'")
        name = f"ghost_{where}"
        if hasattr(layer, name):
            continue
        layer.add_module(name, GhostOperator(hidden))
        if where == "pre":
            layer.register_forward_pre_hook(_pre_hook, with_kwargs=True)
        else:
            layer.register_forward_hook(_post_hook)
