"""Depth pruning of Hugging Face decoder models: the residual stream at every block boundary, and block removal.

Shared by LoRP (:mod:`leantrain.prune.lorp`), its baselines and Ghosted Layers (:mod:`leantrain.prune.ghosted`):

- :func:`decoder_layers` finds the decoder block list (``model.model.layers`` for Llama, Mistral, Qwen, ...);
- :func:`boundary_states` runs calibration batches once through the unpruned model and returns the hidden state
  entering every block plus the one leaving the last (N + 1 boundaries, before the final norm), token rows
  with padding dropped;
- :func:`layer_similarity` is LoRP's S_ij: the mean over tokens of the cosine between block inputs i and j;
- :func:`remove_layers` deletes blocks and keeps the model working: ``config.num_hidden_layers``,
  ``config.layer_types`` and every attention module's ``layer_idx`` (the KV-cache slot) are renumbered, so
  ``generate()`` with a cache, ``save_pretrained`` and ``from_pretrained`` all work on the smaller model.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from leantrain.errors import ConfigError

Batch = dict[str, torch.Tensor]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder block list of a Hugging Face causal LM (``model.model.layers``)."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise ConfigError(
            f"{type(model).__name__} has no decoder block list at model.model.layers; depth pruning supports "
            "Hugging Face decoder models such as Llama, Mistral and Qwen"
        )
    return layers


def resolve_indices(indices: Iterable[int], num_layers: int, protect: Sequence[int] = ()) -> list[int]:
    """Sorted unique block indices (negative ones count from the end), checked against range and ``protect``."""
    protected = {p % num_layers for p in protect}
    out = set()
    for i in indices:
        if not isinstance(i, int) or isinstance(i, bool) or not -num_layers <= i < num_layers:
            raise ConfigError(f"layer index {i!r} is out of range for a model with {num_layers} layers")
        out.add(i % num_layers)
    hit = sorted(out & protected)
    if hit:
        raise ConfigError(f"layers {hit} are protected (first/last by default) and cannot be removed")
    if len(out) >= num_layers:
        raise ConfigError(f"cannot remove all {num_layers} layers")
    return sorted(out)


def check_budget(num_remove: int, num_layers: int, protect: Sequence[int]) -> None:
    """A clear error when ``num_remove`` blocks cannot be removed without touching ``protect``."""
    free = num_layers - len({p % num_layers for p in protect})
    if not isinstance(num_remove, int) or isinstance(num_remove, bool) or not 0 <= num_remove <= free:
        raise ConfigError(
            f"cannot remove {num_remove!r} of {num_layers} layers with {num_layers - free} protected; choose 0..{free}"
        )


@dataclass
class BoundaryStates:
    """Hidden states at the N + 1 block boundaries, token rows stacked over the calibration batches.

    ``states[i]`` (T, C) enters block i for i < N; ``states[N]`` leaves the last block (before the final norm).
    """

    states: list[torch.Tensor]

    @property
    def tokens(self) -> int:
        return self.states[0].shape[0]


def _token_mask(batch: Batch) -> torch.Tensor:
    mask = batch.get("attention_mask")
    ids = batch["input_ids"]
    return torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()


class _Captured(Exception):
    """Raised by a capture hook once the deepest wanted boundary is in: the rest of the forward is not needed."""


@torch.no_grad()
def boundary_batches(
    model: nn.Module, batches: Iterable[Batch], max_tokens: int | None = None, dtype: torch.dtype = torch.float32,
    wanted: Iterable[int] | None = None,
) -> Iterator[dict[int, torch.Tensor]]:  # fmt: skip
    """Per calibration batch, the hidden states at the ``wanted`` block boundaries (default all N + 1) as
    {boundary: (tokens, C)}, padding dropped, the last batch trimmed to ``max_tokens`` in all. One batch at a time:
    memory is one batch's activations, whatever the number of batches. Each forward stops at the deepest wanted
    boundary (never computing the logits)."""
    layers = decoder_layers(model)
    n = len(layers)
    keep = set(range(n + 1)) if wanted is None else {int(i) for i in wanted}
    last_wanted = max(keep)
    captured: dict[int, torch.Tensor] = {}
    current: dict[str, torch.Tensor] = {}

    def pre_hook(index: int):
        def hook(_module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            captured[index] = h[current["mask"]].to(dtype)  # (tokens, C)
            if index == last_wanted:
                raise _Captured  # nothing deeper is needed: skip the remaining blocks

        return hook

    def last_hook(_module, _args, _kwargs, output):
        h = output[0] if isinstance(output, tuple) else output
        captured[n] = h[current["mask"]].to(dtype)
        raise _Captured  # skip the final norm and the vocabulary projection (logits: tokens x vocab floats)

    handles = [layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True) for i, layer in enumerate(layers)
               if i in keep]  # fmt: skip
    if n in keep:
        handles.append(layers[-1].register_forward_hook(last_hook, with_kwargs=True))
    was_training = model.training
    model.eval()
    seen = 0
    try:
        for batch in batches:
            current["mask"] = _token_mask(batch)
            captured.clear()
            try:
                model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False)
            except _Captured:
                pass
            count = int(current["mask"].sum())
            take = count if max_tokens is None else min(count, max_tokens - seen)
            seen += take
            if take:
                yield {i: h[:take] for i, h in captured.items()}
            if max_tokens is not None and seen >= max_tokens:
                break
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if not seen:
        raise ConfigError("the calibration batches hold no tokens")


def boundary_states(
    model: nn.Module, batches: Iterable[Batch], max_tokens: int | None = None, dtype: torch.dtype = torch.float32
) -> BoundaryStates:
    """Run ``batches`` (dicts with ``input_ids`` and optional ``attention_mask``) and keep every boundary.

    Holds (N + 1) x tokens x C values (about 2.3 GB in float32 for a 30-block, C = 576 model at 16k tokens); the
    selectors and the recovery fit also take the batches themselves and stream them (:func:`boundary_similarity`,
    :func:`leantrain.prune.ghosted.gap_moments`), holding one batch at a time.
    """
    captured: list[list[torch.Tensor]] = []
    for per_batch in boundary_batches(model, batches, max_tokens, dtype):
        captured.append([per_batch[i] for i in range(len(per_batch))])
    return BoundaryStates([torch.cat(column) for column in zip(*captured, strict=True)])


@dataclass
class BoundarySimilarity:
    """mean over tokens of cos(h_i(t), h_j(t)) between all N + 1 block boundaries, (N + 1, N + 1) float64 with a
    unit diagonal: what LoRP (block inputs i, j < N), ShortGPT (i, i + 1) and LLM-Streamline (i, i + n) need."""

    cosine: torch.Tensor
    tokens: int


_CHUNK = 2048  # token rows per accumulation step when the states are already held


def boundary_similarity(source: BoundaryStates | nn.Module, calibration: Iterable[Batch] | None = None,
                        max_tokens: int | None = None) -> BoundarySimilarity:  # fmt: skip
    """:class:`BoundarySimilarity` of held :class:`BoundaryStates`, or of a model on ``calibration`` batches,
    accumulated one batch at a time (memory: one batch of activations, not the whole stack)."""
    if isinstance(source, BoundaryStates):
        total = source.tokens
        chunks = ({i: h[a : a + _CHUNK] for i, h in enumerate(source.states)} for a in range(0, total, _CHUNK))
    elif calibration is None:
        raise ConfigError("boundary_similarity(model, calibration) needs the calibration batches")
    else:
        chunks = boundary_batches(source, calibration, max_tokens)
    acc, tokens = None, 0
    for chunk in chunks:
        h = nn.functional.normalize(torch.stack([chunk[i] for i in range(len(chunk))]).double(), dim=-1)
        part = torch.einsum("itc,jtc->ij", h, h)  # (N + 1, N + 1) sums over this chunk's tokens
        acc = part if acc is None else acc + part
        tokens += h.shape[1]
    if acc is None or not tokens:
        raise ConfigError("the calibration batches hold no tokens")
    cosine = (acc + acc.T) / (2 * tokens)  # symmetric by construction (the kernel's sums may differ in the last bit)
    cosine.fill_diagonal_(1.0)
    return BoundarySimilarity(cosine, tokens)


def similarity_of(model: nn.Module, calibration: Iterable[Batch] | BoundaryStates | BoundarySimilarity
                  ) -> BoundarySimilarity:  # fmt: skip
    """The :class:`BoundarySimilarity` of whatever calibration form a selector was given."""
    if isinstance(calibration, BoundarySimilarity):
        return calibration
    if isinstance(calibration, BoundaryStates):
        return boundary_similarity(calibration)
    return boundary_similarity(model, calibration)


def layer_similarity(
    source: BoundaryStates | BoundarySimilarity | nn.Module, calibration: Iterable[Batch] | None = None
) -> torch.Tensor:
    """LoRP's S (N, N): mean over tokens of cos(h_i(t), h_j(t)) between block inputs, diagonal set to 1.

    ``source`` is captured :class:`BoundaryStates` or :class:`BoundarySimilarity`, or a model with its
    ``calibration`` batches (streamed). The official code averages per-batch token means; over equal-length batches
    (fixed calibration windows, as here) that is the mean over all tokens, which is what this computes.
    """
    if isinstance(source, nn.Module):
        if calibration is None:
            raise ConfigError("layer_similarity(model, calibration) needs the calibration batches")
        sim = boundary_similarity(source, calibration)
    else:
        sim = source if isinstance(source, BoundarySimilarity) else boundary_similarity(source)
    return sim.cosine[:-1, :-1].clone()


def remove_layers(model: nn.Module, indices: Iterable[int], protect: Sequence[int] = (0, -1)) -> nn.Module:
    """Delete decoder blocks ``indices`` in place and renumber what depends on layer positions; returns ``model``.

    ``protect`` (default first and last) may not be removed; pass ``protect=()`` to allow it.
    """
    layers = decoder_layers(model)
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "is_heterogeneous", False):
        raise ConfigError("remove_layers does not support per-layer (heterogeneous) configs")
    n = len(layers)
    drop = set(resolve_indices(indices, n, protect))
    if not drop:
        return model
    keep = [i for i in range(n) if i not in drop]
    kept = nn.ModuleList(layers[i] for i in keep)
    for new_index, layer in enumerate(kept):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    getattr(model, "model", model).layers = kept
    if config is not None:
        config.num_hidden_layers = len(keep)
        layer_types = getattr(config, "layer_types", None)
        if isinstance(layer_types, list) and len(layer_types) == n:
            config.layer_types = [layer_types[i] for i in keep]
    return model
